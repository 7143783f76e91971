"""Learning a whitening for a model: Lw on training pairs, or PCA on a separate set of images or a store.

Descriptors are extracted with the evaluation's settings into cached, resumable stores. Protocol and
file formats: docs/retrieval.md (post-processing) and docs/engine.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from dtop.engine.extract import extract_to_store, model_info, settings_digest, settings_record
from dtop.engine.mining import training_pairs
from dtop.engine.settings import ExtractSettings
from dtop.errors import ConfigError, DataError
from dtop.models.base import WHITENING_EXTRA, CheckpointExtra, RetrievalModel
from dtop.models.checkpoint import read_checkpoint, save_checkpoint
from dtop.models.identity import model_fingerprint
from dtop.retrieval.store import DescriptorStore
from dtop.retrieval.whitening import Whitening, fit_learned_whitening, fit_pca_whitening

if TYPE_CHECKING:
    from dtop.data.training import TrainingSet

log = logging.getLogger(__name__)

#: ``lw``: learned whitening on matching pairs (Radenović et al.); ``pca``: PCA-whitening.
WhiteningMethod = Literal["lw", "pca"]


def store_folder(cache_dir: str | os.PathLike, model: RetrievalModel, settings: ExtractSettings, name: str,
                 paths: Sequence[str]) -> Path:
    """``<cache>/<fingerprint>/<settings digest>/whiten-<name>-<image-list hash>``, the evaluation's layout."""
    digest = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return Path(cache_dir) / model_fingerprint(model) / settings_digest(model, settings) / f"whiten-{tag}-{digest}"


def _provenance(whitening: Whitening, model: RetrievalModel, settings: ExtractSettings,
                source: dict[str, Any]) -> Whitening:
    """Record which model, extraction settings and images the whitening was learned from."""
    whitening.info.update(model_fingerprint=model_fingerprint(model), extraction=settings_record(model, settings),
                          source=source)
    return whitening


def _descriptors(model: RetrievalModel, paths: list[str], cache_dir: str | os.PathLike, name: str,
                 settings: ExtractSettings, runtime: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """Descriptors of ``paths`` through a cached store (resumable), and the mask of the readable ones."""
    out = store_folder(cache_dir, model, settings, name, paths)
    store = extract_to_store(model, paths, out, settings=settings, **runtime)
    descriptors, valid = store.load()
    valid = np.asarray(valid, dtype=bool)
    if not valid.all():
        log.warning("%d of %d image(s) unreadable, left out of the whitening (listed in %s)",
                    int((~valid).sum()), len(valid), out / "manifest.json")
    return torch.as_tensor(descriptors), valid


def sample_pairs(qidxs: np.ndarray, pidxs: np.ndarray, max_pairs: int | None, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_pairs`` of the pairs, drawn without replacement (deterministic for ``seed``), in order."""
    if max_pairs is None or len(qidxs) <= max_pairs:
        return qidxs, pidxs
    if max_pairs < 1:
        raise ConfigError(f"max_pairs must be at least 1, got {max_pairs}")
    pick = np.sort(np.random.default_rng(seed).choice(len(qidxs), size=max_pairs, replace=False))
    return qidxs[pick], pidxs[pick]


def learn_lw(
    model: RetrievalModel,
    training_set: TrainingSet,
    cache_dir: str | os.PathLike,
    settings: ExtractSettings | None = None,
    *,
    dim: int | None = None,
    eps: float = 1e-6,
    max_pairs: int | None = None,
    seed: int = 0,
    **runtime: Any,
) -> Whitening:
    """Learned whitening (cirtorch ``Lw``) on the (query, positive) pairs of ``training_set``.

    The pairs are the set's own (SfM-120k ``qidxs``/``pidxs``) or one per image of a class and the
    next image of its class. As in cirtorch, the mean is that of the query images, the intra-pair
    covariance that of the pairs, and the inter-class scatter that of all images of the set; with
    ``max_pairs`` that many pairs are drawn and only their images are described (the scatter is
    then over those). Pairs with an unreadable image are left out. ``runtime`` goes to
    :func:`~dtop.engine.extract.extract_to_store`.
    """
    settings = settings or ExtractSettings()
    qidxs, pidxs = sample_pairs(*training_pairs(training_set), max_pairs, seed)
    # rows of the store, in training-set order
    images = np.arange(len(training_set)) if max_pairs is None else np.unique(np.concatenate([qidxs, pidxs]))
    paths = [training_set.paths[i] for i in images.tolist()]
    descriptors, valid = _descriptors(model, paths, cache_dir, training_set.name, settings, runtime)
    q_rows, p_rows = np.searchsorted(images, qidxs), np.searchsorted(images, pidxs)
    keep = valid[q_rows] & valid[p_rows]
    if not keep.any():
        raise DataError(f"no pair of {training_set.name} has two readable images; nothing to learn from")
    whitening = fit_learned_whitening(descriptors, q_rows[keep], p_rows[keep], dim=dim, eps=eps,
                                      fitted_on=training_set.name)
    source = {"kind": "training-set", "name": training_set.name, "root": training_set.root,
              "num_images": len(paths), "pairs_left_out": int((~keep).sum())}
    return _provenance(whitening, model, settings, source)


def learn_pca(
    model: RetrievalModel,
    paths: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    settings: ExtractSettings | None = None,
    *,
    name: str = "images",
    dim: int | None = None,
    shrinkage: float = 0.0,
    eps: float = 1e-6,
    **runtime: Any,
) -> Whitening:
    """PCA-whitening on the descriptors of ``paths`` (a set apart from the evaluated one)."""
    settings = settings or ExtractSettings()
    names = [os.fsdecode(p) for p in paths]
    if not names:
        raise DataError(f"{name}: no images to learn a PCA-whitening from")
    descriptors, valid = _descriptors(model, names, cache_dir, name, settings, runtime)
    whitening = fit_pca_whitening(descriptors[torch.from_numpy(valid)], dim=dim, shrinkage=shrinkage, eps=eps,
                                  fitted_on=name)
    return _provenance(whitening, model, settings, {"kind": "images", "name": name, "num_images": len(names)})


def learn_pca_from_store(
    model: RetrievalModel,
    store: str | os.PathLike,
    settings: ExtractSettings | None = None,
    *,
    dim: int | None = None,
    shrinkage: float = 0.0,
    eps: float = 1e-6,
) -> Whitening:
    """PCA-whitening on an existing descriptor store, which must hold ``model``'s descriptors at ``settings``."""
    settings = settings or ExtractSettings()
    opened = DescriptorStore.open(store)
    wanted = {**settings_record(model, settings), "crops": opened.settings.get("crops")}
    diffs = opened.differences(wanted, model_info(model))
    if diffs:
        raise DataError(
            f"{store} holds descriptors of another model or settings ({'; '.join(diffs[:4])}): a whitening is "
            "learned with the model and extraction settings it is used with; pass the settings of the store "
            "(--image-size, --scales, ...) or extract it again (dtop extract)"
        )
    descriptors, valid = opened.load()
    whitening = fit_pca_whitening(torch.as_tensor(descriptors)[torch.as_tensor(valid, dtype=torch.bool)], dim=dim,
                                  shrinkage=shrinkage, eps=eps, fitted_on=Path(store).name)
    source = {"kind": "store", "name": Path(store).name, "num_images": opened.num_images}
    return _provenance(whitening, model, settings, source)


def whitening_mismatches(whitening: Whitening, model: RetrievalModel, settings: ExtractSettings) -> list[str]:
    """How ``whitening`` was learned differently from how ``model``'s descriptors are extracted now.

    Empty when it matches, or when the whitening does not record it (made in code, or by an older dtop).
    """
    out = []
    learned_with = whitening.info.get("model_fingerprint")
    if learned_with is not None and learned_with != model_fingerprint(model):
        out.append(f"it was learned for model {learned_with}, not {model_fingerprint(model)}")
    extraction = whitening.info.get("extraction")
    if extraction is not None and extraction != settings_record(model, settings):
        out.append(f"it was learned with extraction settings {extraction}, not {settings_record(model, settings)}")
    return out


def warn_on_mismatch(whitening: Whitening, model: RetrievalModel, settings: ExtractSettings) -> None:
    """Log a warning for each :func:`whitening_mismatches` of ``whitening`` with ``model`` at ``settings``."""
    for problem in whitening_mismatches(whitening, model, settings):
        log.warning("the whitening (%s) may not suit these descriptors: %s; learn one for them with `dtop whiten`",
                    whitening.info.get("fitted_on") or whitening.kind, problem)


def save_with_whitening(model: RetrievalModel, whitening: Whitening, out: str | os.PathLike,
                        source: str | os.PathLike | None = None) -> Path:
    """A copy of the model's checkpoint at ``out`` that carries ``whitening`` as its whitening extra.

    ``source``: the checkpoint the model was loaded from, whose metadata (step, epoch, run) is kept.
    The copy has the model's fingerprint (extras are not part of it), so its descriptor caches apply.
    """
    if whitening.input_dim != model.descriptor_dim:
        raise DataError(f"the whitening takes {whitening.input_dim}-d descriptors; the model makes "
                        f"{model.descriptor_dim}-d ones")
    metadata = read_checkpoint(source).metadata if source is not None else {}
    extras = {**model.checkpoint_extras, WHITENING_EXTRA: CheckpointExtra(*whitening.to_state())}
    return save_checkpoint(model, out, extras=extras, metadata=metadata)
