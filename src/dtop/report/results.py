"""Reading an evaluation folder (``dtop evaluate`` output): results, ranks, dataset, training runs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dtop.errors import DataError


def load_results(eval_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<eval_dir>/results.json`` (written by ``dtop evaluate``)."""
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        raise DataError(f"{path} not found: pass the output folder of `dtop evaluate` (it holds results.json)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); run `dtop evaluate` again") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), list) or not payload["models"]:
        raise DataError(f"{path}: no 'models' list; is this the results.json of `dtop evaluate`?")
    for i, entry in enumerate(payload["models"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
                entry.get("results"), dict):
            raise DataError(f"{path}: models[{i}] needs a 'name' (a string) and 'results' (an object); the file was "
                            "edited or damaged: run `dtop evaluate` again")
    return payload


def open_dataset(payload: dict[str, Any], eval_dir: Path) -> tuple[Any, str | None]:
    """The evaluated :class:`~dtop.data.revisited.RevisitedDataset`, or (None, why) when its files are missing."""
    from dtop.data.revisited import RevisitedDataset

    data = payload.get("data") or {}
    attempts: list[tuple[Any, Any]] = []
    if data.get("name"):
        attempts.append((data.get("root"), data["name"]))
    if data.get("gnd"):
        attempts.append((None, data["gnd"]))
        attempts.append((eval_dir, data["gnd"]))
    reasons = []
    for root, name in attempts:
        try:
            return RevisitedDataset(root, name), None
        except DataError as err:
            reasons.append(str(err))
        except (OSError, TypeError) as err:
            reasons.append(f"{name}: {err}")
    return None, (reasons[0] if reasons else "results.json names no dataset ('data': {'root', 'name', 'gnd'})")


def resolve_run(run: str, eval_dir: Path) -> Path | None:
    """The ``metrics.jsonl`` of a model's ``train_run`` (relative to the evaluation or the working folder)."""
    p = Path(run)
    for cand in ([p] if p.is_absolute() else [eval_dir / p, Path.cwd() / p, p]):
        if (cand / "metrics.jsonl").is_file():
            return cand / "metrics.jsonl"
        if cand.is_file() and cand.name.endswith(".jsonl"):
            return cand
    return None


def choose_variant(payload: dict[str, Any], dataset_name: str) -> str:
    """The dataset variant whose ranks a report shows by default: the evaluated dataset without +1M."""
    base = str(payload.get("dataset") or dataset_name)
    names = [v for e in payload["models"] for v in (e.get("ranks") or {})]
    if base in names or not names:
        return base
    return next((v for v in names if not v.endswith("+1m")), names[0])


def load_ranks(entry: dict[str, Any], variant: str, eval_dir: Path, n_queries: int) -> np.ndarray | None:
    """A model's stored ranks (topk, n_queries) on ``variant``; None when the evaluation stored none."""
    rel = (entry.get("ranks") or {}).get(variant)
    if not rel:
        return None
    path = Path(rel) if Path(rel).is_absolute() else eval_dir / rel
    if not path.is_file():
        raise DataError(
            f"{path}: ranks file of model {entry['name']!r} ({variant}) not found; run `dtop evaluate` again"
        )
    try:
        ranks = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy ranks array ({err})") from err
    if ranks.ndim != 2 or ranks.shape[1] != n_queries or not np.issubdtype(ranks.dtype, np.integer):
        raise DataError(
            f"{path}: ranks must be an integer array (topk, n_queries={n_queries}), got {ranks.dtype} {ranks.shape}"
        )
    return ranks


def slug(name: str, taken: set[str]) -> str:
    """A file-name-safe form of ``name``, not yet in ``taken`` (to which it is added)."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "model"
    candidate, i = base, 2
    while candidate in taken:
        candidate, i = f"{base}-{i}", i + 1
    taken.add(candidate)
    return candidate


def name_heatmap_models(heatmap_models: Sequence[Any] | None, models: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(display name, model) pairs; a bare model is named after the evaluated model with its fingerprint."""
    out: list[tuple[str, Any]] = []
    if not heatmap_models:
        return out
    by_fp = {e.get("fingerprint"): e["name"] for e in models if e.get("fingerprint")}
    for i, item in enumerate(heatmap_models):
        if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
            continue
        name = None
        if by_fp:
            try:
                from dtop.models.identity import model_fingerprint

                name = by_fp.get(model_fingerprint(item))
            except Exception:  # a model the fingerprint cannot handle is still shown, under a generic name
                name = None
        arch = getattr(getattr(item, "config", None), "arch", type(item).__name__)
        out.append((name or f"{arch} #{i + 1}", item))
    return out
