"""The evaluation pipeline on a revisited benchmark: extract → (post-process) → search → score.

Descriptor stores are cached per model fingerprint and extraction settings (see docs/engine.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtop import __version__
from dtop.data.gnd import GroundTruth
from dtop.data.revisited import RevisitedDataset, load_r1m_list
from dtop.engine.extract import extract_to_store, settings_digest, settings_record
from dtop.engine.runtime import resolve_device
from dtop.engine.settings import ExtractSettings
from dtop.engine.whiten import warn_on_mismatch
from dtop.models.base import WHITENING_EXTRA, RetrievalModel
from dtop.models.identity import model_fingerprint
from dtop.retrieval.metrics import PROTOCOLS, evaluate_scores, score_and_search
from dtop.retrieval.positions import ScoreBlocks
from dtop.retrieval.postprocess import Diffusion, PostProcessing, Whiten, Whitening
from dtop.retrieval.rerank import evaluate_reranked
from dtop.retrieval.search import RunningTopK, iter_scores, to_ranks
from dtop.retrieval.store import DescriptorStore, Failure
from dtop.utils.io import atomic_path, write_json, write_text
from dtop.utils.paths import show_path

log = logging.getLogger(__name__)

R1M_TAG = "+1m"
#: How ``dtop evaluate --skip-bad`` scores the images it could not read (results.json states it too).
UNREADABLE_RULE = ("an unreadable query scores AP 0 and P@k 0; an unreadable database image or distractor is "
                   "never retrieved: it is ranked after every readable image")
#: The score given to unreadable database images: below every cosine similarity of unit descriptors.
UNREADABLE_SCORE = -4.0
#: How many unreadable images of each kind results.json lists by name (all are counted).
LISTED_UNREADABLE = 50


@dataclasses.dataclass
class Unreadable:
    """The images of a benchmark that could not be read: queries, database images, distractors."""

    queries: list[Failure] = dataclasses.field(default_factory=list)
    database: list[Failure] = dataclasses.field(default_factory=list)
    distractors: list[Failure] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.queries or self.database or self.distractors)

    def columns(self, n_database: int, with_distractors: bool) -> np.ndarray:
        """Sorted score columns of the unreadable images: database indices, then ``n_database`` + distractor index."""
        cols = [f.index for f in self.database]
        if with_distractors:
            cols += [n_database + f.index for f in self.distractors]
        return np.array(sorted(cols), dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """The record of results.json: counts, the first names with their reasons, and the rule."""
        def listed(failures: list[Failure]) -> dict[str, Any]:
            return {"count": len(failures), "images": [f.to_dict() for f in failures[:LISTED_UNREADABLE]]}

        return {"queries": listed(self.queries), "database": listed(self.database),
                "distractors": listed(self.distractors), "rule": UNREADABLE_RULE}

    def summary(self) -> str:
        """How many of each kind, e.g. ``1 query, 2 database images`` (empty when none)."""
        return unreadable_summary({"queries": len(self.queries), "database": len(self.database),
                                   "distractors": len(self.distractors)})


def unreadable_summary(counts: dict[str, int]) -> str:
    """``{"queries": 1, "database": 2, "distractors": 0}`` as ``1 query, 2 database images``."""
    words = {"queries": ("query", "queries"), "database": ("database image", "database images"),
             "distractors": ("distractor", "distractors")}
    return ", ".join(f"{n} {words[k][n != 1]}" for k, n in counts.items() if n)


def dataset_tag(dataset: RevisitedDataset) -> str:
    """A file-name-safe tag of a dataset: its name plus a hash of its ground-truth path."""
    digest = hashlib.sha256(str(Path(dataset.gnd_path).resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', dataset.name)}-{digest}"


def post_processing_for(post: list[str] | None, model: RetrievalModel) -> PostProcessing | None:
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
    for step in post_processing_for(post, model) or []:  # a step that cannot run fails now, not after extracting
        if isinstance(step, Whiten) and step.whitening is not None:
            warn_on_mismatch(step.whitening, model, settings)
    start = time.perf_counter()
    queries, variants, stores, unreadable = _extract_benchmark(model, dataset, base, settings, r1m_paths, runtime)
    extract_s = time.perf_counter() - start
    start = time.perf_counter()
    results, ranks, described, transductive = {}, {}, [], False
    for variant, parts in variants.items():
        q, db = queries, parts
        pp = post_processing_for(post, model)
        if pp is not None:
            if isinstance(pp.reranker, Diffusion):
                if pp.reranker.cache is None:
                    pp.reranker.cache = str(base / "knn-graphs")  # its k-NN graph is kept like the descriptors
                if pp.reranker.device is None and runtime.get("device"):
                    pp.reranker.device = resolve_device(runtime["device"])  # built where the model ran
            full = torch.cat([torch.as_tensor(np.asarray(p)) for p in parts]) if len(parts) > 1 else parts[0]
            q, full = pp.process(torch.as_tensor(queries), torch.as_tensor(full))
            db = [full]
            described, transductive = pp.describe(), pp.transductive
        reranker = pp.reranker if pp is not None else None
        results[variant], indices = _score(q, db, dataset, topk, reranker, unreadable, variant.endswith(R1M_TAG))
        ranks[variant] = to_ranks(indices)
    return {
        "fingerprint": fingerprint,
        "results": results,
        "ranks_arrays": ranks,
        "stores": {k: str(v) for k, v in stores.items()},
        "extraction": settings_record(model, settings),  # scale_pool resolved for this model
        "unreadable": unreadable.to_dict() if unreadable else None,
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
) -> tuple[Any, dict[str, list[Any]], dict[str, Path], Unreadable]:
    """Descriptors of the queries and of each database variant (the dataset, and +1M), via stores.

    Returns ``(queries, {variant: [database parts]}, {store role: folder}, unreadable images)``; the
    rows of unreadable images are zero (with ``skip_bad``; without it their extraction fails).
    """
    tag = dataset_tag(dataset)
    stores = {"queries": base / f"{tag}-queries", "database": base / f"{tag}-database"}
    unreadable = Unreadable()
    q_store = extract_to_store(model, dataset.query_paths, stores["queries"], bbxs=dataset.query_bbxs,
                               settings=settings, **runtime)
    db_store = extract_to_store(model, dataset.database_paths, stores["database"], settings=settings, **runtime)
    queries, _ = q_store.load()
    database, _ = db_store.load()
    unreadable.queries, unreadable.database = q_store.failures(), db_store.failures()
    variants: dict[str, list[Any]] = {dataset.name: [database]}
    if r1m_paths is not None:
        stores["distractors"] = base / "revisitop1m"
        d_store: DescriptorStore = extract_to_store(model, r1m_paths, stores["distractors"], settings=settings,
                                                    **{**runtime, "skip_bad": True})
        distractors, _ = d_store.load(mmap=True)
        unreadable.distractors = d_store.failures()
        variants[dataset.name + R1M_TAG] = [database, distractors]
    if unreadable:
        first = (unreadable.queries or unreadable.database or unreadable.distractors)[0]
        log.warning("%s unreadable (e.g. %s: %s); scored by the rule: %s", unreadable.summary(),
                    show_path(first.path), first.reason, UNREADABLE_RULE)
    return queries, variants, stores, unreadable


def _score(queries: Any, database: list[Any], dataset: RevisitedDataset, topk: int, reranker: Any,
           unreadable: Unreadable, with_distractors: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Results and top-``topk`` indices of one database variant, unreadable images scored by the rule."""
    gnd = _without_queries(dataset.gnd, unreadable.queries)
    if reranker is not None:  # each list: its re-ranked top, then the rest in plain order
        if unreadable.database or unreadable.distractors:
            log.warning("with a re-ranking step, unreadable database images keep zero descriptors (score 0)")
        results, indices = evaluate_reranked(queries, database[0], gnd, reranker, topk)
    elif unreadable:
        cols = unreadable.columns(dataset.n_database, with_distractors)
        results, indices = _score_without(queries, database, gnd, topk, cols)
    else:
        results, indices = score_and_search(queries, database, dataset.gnd, topk=topk)  # one pass
    if unreadable.queries:
        results = _unreadable_queries_score_zero(results, dataset.gnd, unreadable.queries)
    return results, indices


def _without_queries(gnd: GroundTruth, failures: list[Failure]) -> GroundTruth:
    """``gnd`` with the queries of ``failures`` left without positives or junk (they are scored apart)."""
    if not failures:
        return gnd
    missing = {f.index for f in failures}
    entries = [{**q, "easy": [], "hard": [], "junk": []} if i in missing else q for i, q in enumerate(gnd.gnd)]
    return GroundTruth(gnd.imlist, gnd.qimlist, entries, name=gnd.name, source=gnd.source)


def _score_without(queries: Any, database: list[Any], gnd: GroundTruth, topk: int, columns: np.ndarray
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`~dtop.retrieval.metrics.score_and_search` with the score ``columns`` (unreadable images)
    put below every other image, so that they are never retrieved."""
    best = RunningTopK(int(topk))

    def blocks() -> Iterator[Any]:
        start = 0
        for block in iter_scores(queries, database):
            n = int(block.shape[1])
            lo, hi = np.searchsorted(columns, [start, start + n])
            if hi > lo:
                block = block.clone()
                block[:, torch.as_tensor(columns[lo:hi] - start, device=block.device)] = UNREADABLE_SCORE
            yield block
            best.update(block)
            start += n

    results = evaluate_scores(ScoreBlocks(blocks()), gnd)  # blocks are new tensors (or clones)
    return results, best.result()[1]


def _unreadable_queries_score_zero(results: dict[str, Any], gnd: GroundTruth, failures: list[Failure]
                                   ) -> dict[str, Any]:
    """Results in which each unreadable query (scored without positives) counts with AP 0 and P@k 0."""
    missing = {f.index for f in failures}
    out = {}
    for name, res in results.items():
        aps = list(res["aps"])
        n_scored = sum(a is not None for a in aps)
        for q, truth in enumerate(gnd.protocol(name)):
            if q in missing and truth[0].size:  # a query without positives here stays unscored
                aps[q] = 0.0
        n_all = sum(a is not None for a in aps)
        if n_all == n_scored:
            out[name] = res
            continue
        total = 0.0
        for a in aps:  # in query order, as the metrics add
            total = total + (a or 0.0)
        mp = {k: (v * n_scored / n_all if n_scored else 0.0) for k, v in res["mp"].items()}
        out[name] = {**res, "map": total / n_all, "mp": mp, "aps": aps}
    return out


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
    notes = [f"{e['name']}: " + unreadable_summary({k: e["unreadable"][k]["count"] for k in
                                                    ("queries", "database", "distractors")}) + " unreadable"
             for e in models if e.get("unreadable")]
    if notes:
        lines += ["", *notes, f"  ({UNREADABLE_RULE}; listed in results.json)"]
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
