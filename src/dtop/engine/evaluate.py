"""The evaluation pipeline on a revisited benchmark: extract → (post-process) → search → score.

Descriptor stores are cached per model fingerprint and extraction settings (see docs/engine.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtop import __version__
from dtop.data.revisited import RevisitedDataset, load_r1m_list
from dtop.engine.extract import extract_to_store, settings_digest, settings_record
from dtop.engine.settings import ExtractSettings
from dtop.engine.whiten import warn_on_mismatch
from dtop.models.base import WHITENING_EXTRA, RetrievalModel
from dtop.models.identity import model_fingerprint
from dtop.retrieval.metrics import PROTOCOLS, score_and_search
from dtop.retrieval.postprocess import Diffusion, PostProcessing, Whiten, Whitening
from dtop.retrieval.rerank import evaluate_reranked
from dtop.retrieval.search import to_ranks
from dtop.utils.io import atomic_path, write_json, write_text

R1M_TAG = "+1m"


def dataset_tag(dataset: RevisitedDataset) -> str:
    """A file-name-safe tag of a dataset: its name plus a hash of its ground-truth path."""
    digest = hashlib.sha256(str(Path(dataset.gnd_path).resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', dataset.name)}-{digest}"


def _post_processing(post: list[str] | None, model: RetrievalModel) -> PostProcessing | None:
    """The post-processing steps of ``post``, checked; a bare ``whiten`` takes the checkpoint's whitening.

    A ``whiten`` step with neither a file, the checkpoint's whitening nor ``fit=database`` is a
    :class:`~dtop.errors.ConfigError` (raised here, before anything is extracted).
    """
    if not post:
        return None
    pp = PostProcessing.from_config(post)
    saved = model.checkpoint_extras.get(WHITENING_EXTRA)
    for step in pp:
        if isinstance(step, Whiten) and saved is not None and not step.fitted and step.fit_on is None:
            step.set_whitening(Whitening.from_state(saved.tensors, saved.metadata))
    return pp.check()


def evaluate_model(
    model: RetrievalModel,
    dataset: RevisitedDataset,
    cache_dir: str | os.PathLike,
    settings: ExtractSettings | None = None,
    r1m_paths: list[Path] | None = None,
    post: list[str] | None = None,
    topk: int = 100,
    **runtime: Any,
) -> dict[str, Any]:
    """Results of one model on one benchmark (and +1M when ``r1m_paths`` are given).

    Returns ``{"fingerprint", "results": {tag: protocols}, "ranks_arrays": {tag: (topk, nq)},
    "stores": {...}, "post": [...], "transductive": bool, "timing": {...}}``; ``transductive`` is
    true when a step learned from the evaluated database (``whiten:fit=database``). ``runtime`` goes to
    :func:`~dtop.engine.extract.extract_to_store` (batch_size, num_workers, device, amp, ...).
    """
    settings = settings or ExtractSettings()
    fingerprint = model_fingerprint(model)
    base = Path(cache_dir) / fingerprint / settings_digest(model, settings)
    for step in _post_processing(post, model) or []:  # a step that cannot run fails now, not after extracting
        if isinstance(step, Whiten) and step.whitening is not None:
            warn_on_mismatch(step.whitening, model, settings)
    start = time.perf_counter()
    queries, variants, stores = _extract_benchmark(model, dataset, base, settings, r1m_paths, runtime)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    results, ranks, described, transductive = {}, {}, [], False
    for variant, parts in variants.items():
        q, db = queries, parts
        pp = _post_processing(post, model)
        if pp is not None:
            if isinstance(pp.reranker, Diffusion) and pp.reranker.cache is None:
                pp.reranker.cache = str(base / "knn-graphs")  # its k-NN graph is kept like the descriptors
            full = torch.cat([torch.as_tensor(np.asarray(p)) for p in parts]) if len(parts) > 1 else parts[0]
            q, full = pp.process(torch.as_tensor(queries), torch.as_tensor(full))
            db = [full]
            described, transductive = pp.describe(), pp.transductive
        if pp is None or pp.reranker is None:
            results[variant], indices = score_and_search(q, db, dataset.gnd, topk=topk)  # one pass
        else:  # each list: its re-ranked top, then the rest in plain order
            results[variant], indices = evaluate_reranked(q, db[0], dataset.gnd, pp.reranker, topk)
        ranks[variant] = to_ranks(indices)
    return {
        "fingerprint": fingerprint,
        "results": results,
        "ranks_arrays": ranks,
        "stores": {k: str(v) for k, v in stores.items()},
        "extraction": settings_record(model, settings),  # scale_pool resolved for this model
        "post": described,
        "transductive": transductive,
        "timing": {"extract_s": extract_s, "search_score_s": time.perf_counter() - start},
    }


def _extract_benchmark(
    model: RetrievalModel,
    dataset: RevisitedDataset,
    base: Path,
    settings: ExtractSettings,
    r1m_paths: list[Path] | None,
    runtime: dict[str, Any],
) -> tuple[Any, dict[str, list[Any]], dict[str, Path]]:
    """Descriptors of the queries and of each database variant (the dataset, and +1M), via stores.

    Returns ``(queries, {variant: [database parts]}, {store role: folder})``.
    """
    tag = dataset_tag(dataset)
    stores = {"queries": base / f"{tag}-queries", "database": base / f"{tag}-database"}
    queries, _ = extract_to_store(model, dataset.query_paths, stores["queries"], bbxs=dataset.query_bbxs,
                                  settings=settings, **runtime).load()
    database, _ = extract_to_store(model, dataset.database_paths, stores["database"], settings=settings,
                                   **runtime).load()
    variants: dict[str, list[Any]] = {dataset.name: [database]}
    if r1m_paths is not None:
        stores["distractors"] = base / "revisitop1m"
        distractors, _ = extract_to_store(model, r1m_paths, stores["distractors"], settings=settings,
                                          **{**runtime, "skip_bad": True}).load(mmap=True)
        variants[dataset.name + R1M_TAG] = [database, distractors]
    return queries, variants, stores


#: Marks a dataset cell of the table whose results used the test images to fit post-processing.
TRANSDUCTIVE_MARK = "*"
TRANSDUCTIVE_NOTE = (f"{TRANSDUCTIVE_MARK} transductive: the whitening was fitted on the evaluated database "
                     "(whiten:fit=database); not comparable with published results")


def format_table(models: list[dict[str, Any]]) -> str:
    """The standard table: mAP (%) E/M/H per dataset variant, one row per model and variant.

    Rows of a transductive evaluation carry :data:`TRANSDUCTIVE_MARK` after the dataset and a
    footnote says why.
    """
    def variant_cell(entry: dict[str, Any], variant: str) -> str:
        return variant + TRANSDUCTIVE_MARK if entry.get("transductive") else variant

    # Name columns widen to the longest entry (plus a gap), so long model names never run into
    # the dataset column.
    name_w = max([len("model"), *(len(e["name"]) for e in models)]) + 2
    variant_w = max([len("dataset"), *(len(variant_cell(e, v)) for e in models for v in e["results"])]) + 2
    header = f"{'model':<{name_w}}{'dataset':<{variant_w}}{'E':>8}{'M':>8}{'H':>8}{'mP@10 M':>10}{'mP@10 H':>10}"
    lines = [header, "-" * len(header)]
    for entry in models:
        for variant, res in entry["results"].items():
            cells = "".join(f"{100 * res[p]['map']:>8.2f}" for p in PROTOCOLS)
            mp = [res[p]["mp"].get("10") for p in ("medium", "hard")]
            mps = "".join(f"{100 * v:>10.2f}" if v is not None else f"{'-':>10}" for v in mp)
            lines.append(f"{entry['name']:<{name_w}}{variant_cell(entry, variant):<{variant_w}}{cells}{mps}")
    if any(e.get("transductive") for e in models):
        lines += ["", TRANSDUCTIVE_NOTE]
    return "\n".join(lines)


def write_evaluation(
    out_dir: str | os.PathLike, payload: dict[str, Any], ranks: dict[str, dict[str, np.ndarray]]
) -> Path:
    """Write ``results.json``, ``results.txt`` and the ranks arrays into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in payload["models"]:
        entry["ranks"] = {}
        for variant, array in ranks[entry["name"]].items():
            name = f"ranks-{re.sub(r'[^A-Za-z0-9_.+-]', '_', entry['name'])}-{variant.replace('/', '_')}.npy"
            with atomic_path(out_dir / name) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, array)
            entry["ranks"][variant] = name
    write_text(out_dir / "results.txt", format_table(payload["models"]) + "\n")
    write_json(out_dir / "results.json", payload)
    return out_dir / "results.json"


def run_evaluation(
    models: list[tuple[str, str, RetrievalModel]],
    data_root: str | os.PathLike,
    dataset: str,
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    r1m_root: str | os.PathLike | None = None,
    settings: ExtractSettings | None = None,
    post: list[str] | None = None,
    topk: int = 100,
    train_runs: dict[str, str | None] | None = None,
    **runtime: Any,
) -> dict[str, Any]:
    """Evaluate ``models`` (name, spec, model) on ``dataset`` and write the evaluation folder."""
    settings = settings or ExtractSettings()
    ds = RevisitedDataset(data_root, dataset)
    r1m_paths = load_r1m_list(r1m_root) if r1m_root else None
    cache_dir = Path(cache_dir) if cache_dir else Path(out_dir) / "descriptors"
    entries, ranks = [], {}
    for name, spec, model in models:
        result = evaluate_model(model, ds, cache_dir, settings, r1m_paths, post, topk, **runtime)
        ranks[name] = result.pop("ranks_arrays")
        entries.append({"name": name, "spec": spec, "config": asdict(model.config),
                        "train_run": (train_runs or {}).get(name), **result})
    payload = {
        "dtop_version": __version__,
        "dataset": ds.name,
        "data": {"root": str(Path(data_root).resolve()), "name": dataset, "gnd": str(ds.gnd_path),
                 "n_queries": ds.n_queries, "n_database": ds.n_database,
                 "n_distractors": len(r1m_paths) if r1m_paths else 0},
        "settings": {**asdict(settings), "post": post or [], "topk": topk,
                     **{k: v for k, v in runtime.items() if k in ("batch_size", "amp", "device")}},
        "models": entries,
        # any model's post-processing learned from the evaluated database (per model: its "transductive")
        "transductive": any(e["transductive"] for e in entries),
    }
    write_evaluation(out_dir, payload, ranks)
    return payload
