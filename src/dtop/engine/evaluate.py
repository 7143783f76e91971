"""The evaluation pipeline: extract → (post-process) → search → score, on a revisited benchmark.

Descriptor stores are cached per model fingerprint and extraction settings under ``cache_dir``
(``<cache>/<fingerprint>/<settings digest>/<dataset>-queries`` …), so a second evaluation of the
same model reuses them, and the +1M distractor store is shared by ROxford and RParis.
Scores are computed in chunks and the protocol positions are counted without sorting
(:func:`dtop.retrieval.metrics.evaluate_scores`); only the top ``topk`` ranks are kept for reports.
"""

from __future__ import annotations

import hashlib
import json
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
from dtop.engine.extract import ExtractSettings, extract_to_store, model_fingerprint
from dtop.models.base import RetrievalModel
from dtop.retrieval.metrics import PROTOCOLS, evaluate_scores
from dtop.retrieval.postprocess import PostProcessing, Whitening
from dtop.retrieval.search import iter_scores, search, to_ranks
from dtop.utils.io import atomic_path, write_json, write_text

R1M_TAG = "+1m"


def settings_digest(settings: ExtractSettings) -> str:
    """Short hash of the extraction settings (names the cache folder)."""
    return hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]


def dataset_tag(dataset: RevisitedDataset) -> str:
    """A file-name-safe tag of a dataset: its name plus a hash of its ground-truth path."""
    digest = hashlib.sha256(str(Path(dataset.gnd_path).resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', dataset.name)}-{digest}"


def _post_processing(post: list[str] | None, model: RetrievalModel) -> PostProcessing | None:
    if not post:
        return None
    pp = PostProcessing.from_config(post)
    extras = getattr(model, "checkpoint_extras", {}) or {}
    if "whiten" in [step.name for step in pp] and "whitening" in extras and not pp["whiten"].fitted:
        meta = (getattr(model, "checkpoint_extras_metadata", {}) or {}).get("whitening", {})
        pp["whiten"].whitening = Whitening.from_state(extras["whitening"], meta)
    return pp


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
    "stores": {...}, "post": [...], "timing": {...}}``. ``runtime`` goes to
    :func:`~dtop.engine.extract.extract_to_store` (batch_size, num_workers, device, amp, ...).
    """
    settings = settings or ExtractSettings()
    fingerprint = model_fingerprint(model)
    base = Path(cache_dir) / fingerprint / settings_digest(settings)
    tag = dataset_tag(dataset)
    timing: dict[str, float] = {}
    stores = {"queries": base / f"{tag}-queries", "database": base / f"{tag}-database"}
    start = time.perf_counter()
    queries, _ = extract_to_store(model, dataset.query_paths, stores["queries"], bbxs=dataset.query_bbxs,
                                  settings=settings, **runtime).load()
    database, _ = extract_to_store(model, dataset.database_paths, stores["database"], settings=settings,
                                   **runtime).load()
    distractors = None
    if r1m_paths is not None:
        stores["distractors"] = base / "revisitop1m"
        distractors, _ = extract_to_store(model, r1m_paths, stores["distractors"], settings=settings,
                                          **{**runtime, "skip_bad": True}).load(mmap=True)
    timing["extract_s"] = time.perf_counter() - start

    variants: dict[str, list] = {dataset.name: [database]}
    if distractors is not None:
        variants[dataset.name + R1M_TAG] = [database, distractors]
    results, ranks, described = {}, {}, []
    start = time.perf_counter()
    for variant, parts in variants.items():
        q, db = queries, parts
        pp = _post_processing(post, model)
        if pp is not None:
            full = torch.cat([torch.as_tensor(np.asarray(p)) for p in parts]) if len(parts) > 1 else parts[0]
            q, full = pp.process(torch.as_tensor(queries), torch.as_tensor(full))
            db = [full]
            described = pp.describe()
        results[variant] = evaluate_scores(iter_scores(q, db), dataset.gnd)
        _, indices = search(q, db, topk=topk)
        ranks[variant] = to_ranks(indices)
    timing["search_score_s"] = time.perf_counter() - start
    return {
        "fingerprint": fingerprint,
        "results": results,
        "ranks_arrays": ranks,
        "stores": {k: str(v) for k, v in stores.items()},
        "post": described,
        "timing": timing,
    }


def format_table(models: list[dict[str, Any]]) -> str:
    """The standard table: mAP (%) E/M/H per dataset variant, one row per model and variant."""
    # Name columns widen to the longest entry (plus a gap), so long model names never run into
    # the dataset column.
    name_w = max([len("model"), *(len(e["name"]) for e in models)]) + 2
    variant_w = max([len("dataset"), *(len(v) for e in models for v in e["results"])]) + 2
    header = f"{'model':<{name_w}}{'dataset':<{variant_w}}{'E':>8}{'M':>8}{'H':>8}{'mP@10 M':>10}{'mP@10 H':>10}"
    lines = [header, "-" * len(header)]
    for entry in models:
        for variant, res in entry["results"].items():
            cells = "".join(f"{100 * res[p]['map']:>8.2f}" for p in PROTOCOLS)
            mp = [res[p]["mp"].get("10") for p in ("medium", "hard")]
            mps = "".join(f"{100 * v:>10.2f}" if v is not None else f"{'-':>10}" for v in mp)
            lines.append(f"{entry['name']:<{name_w}}{variant:<{variant_w}}{cells}{mps}")
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
    }
    write_evaluation(out_dir, payload, ranks)
    return payload
