"""Descriptor extraction: multi-scale, batched by input size, decoded in parallel, into resumable stores.

How batches are planned and why nothing waits for the GPU: docs/engine.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dtop.config import to_dict
from dtop.data.images import (
    ImageListDataset,
    LoadFailure,
    channel_tensors,
    load_image,
    normalize,
    resize_image,
    target_size,
    to_uint8_tensor,
)
from dtop.engine.runtime import (
    Acceleration,
    autocast_context,
    barrier,
    dist_info,
    extraction_defaults,
    intra_op_threads,
    resolve_device,
)
from dtop.engine.settings import DEFAULT_SCALES, ExtractSettings, ScalePool, check_runtime
from dtop.errors import ConfigError, DataError
from dtop.models.base import RetrievalModel
from dtop.models.identity import model_fingerprint
from dtop.models.layers import GeM, l2n
from dtop.retrieval.store import DescriptorStore, Failure
from dtop.utils.paths import show_path

log = logging.getLogger(__name__)


def model_info(model: RetrievalModel) -> dict[str, Any]:
    """What identifies a model in a descriptor store's manifest."""
    return {"fingerprint": model_fingerprint(model), "config": to_dict(model.config)}


def gem_power(model: RetrievalModel) -> float | None:
    """The GeM exponent of a model whose descriptor is its GeM-pooled feature (no projection), else None.

    cirtorch's rule for its multi-scale power mean (GeM pooling, no whitening layer after it); such
    descriptors are non-negative, so their power mean is defined.
    """
    pool = getattr(model, "pool", None)
    if isinstance(pool, GeM) and model.config.arch in ("gem-cnn", "gem-tokens") and model.config.dim is None:
        return float(pool.p.detach())
    return None


def scale_power(model: RetrievalModel, scale_pool: ScalePool) -> float | None:
    """The exponent of the power mean over scales that ``scale_pool`` gives ``model`` (None: plain mean)."""
    if scale_pool == "mean":
        return None
    power = gem_power(model)
    if power is None and scale_pool == "power":
        raise ConfigError(
            f"scale_pool=power needs a GeM model without a projection (its descriptors are non-negative), "
            f"not arch {model.config.arch!r} with dim={model.config.dim}; use scale_pool=mean or auto"
        )
    return power


def settings_record(model: RetrievalModel, settings: ExtractSettings) -> dict[str, Any]:
    """The extraction settings as stores, caches and results record them for ``model``.

    ``scale_pool`` is resolved: ``"power"`` with its exponent ``scale_power``, or left out for the
    plain mean, so that stores and caches written before the option existed (plain mean) still match.
    """
    record = asdict(settings)
    del record["scale_pool"]
    power = scale_power(model, settings.scale_pool)
    if power is not None:
        record.update(scale_pool="power", scale_power=power)
    return record


def settings_digest(model: RetrievalModel, settings: ExtractSettings) -> str:
    """Short hash of :func:`settings_record` (names descriptor cache folders)."""
    return hashlib.sha256(json.dumps(settings_record(model, settings), sort_keys=True).encode()).hexdigest()[:10]


class MultiScaleTransform:
    """Image → list of uint8 tensors (3, H, W), one per scale (picklable for DataLoader workers).

    Normalisation (:func:`dtop.data.images.normalize`) runs on the model's device, after the
    batch is moved there: uint8 is 4× less data through the workers' shared memory and the
    host-to-GPU copy than float32, which keeps decoding hidden behind the model on a GPU.
    """

    def __init__(self, image_size: int, scales: Sequence[float]):
        self.image_size = image_size
        self.scales = list(scales)

    def __call__(self, img) -> list[torch.Tensor]:  # noqa: D102
        return [to_uint8_tensor(resize_image(img, self.image_size * s)) for s in self.scales]


def input_shapes(
    dataset: ImageListDataset, indices: Sequence[int], settings: ExtractSettings
) -> list[tuple[tuple[int, int], ...] | None]:
    """The model-input sizes ``((W, H) per scale)`` each item will have, from the image headers.

    Crops are applied; EXIF orientation is not (with ``exif_transpose`` a rotated image may get
    another shape: :func:`collate_groups` then batches it apart). ``None``: the header is
    unreadable (the item will fail to load, or is batched alone).
    """
    from dtop.data.images import read_image_sizes

    sizes = read_image_sizes([dataset.path(i) for i in indices], progress=False)
    out: list[tuple[tuple[int, int], ...] | None] = []
    for index, (w, h) in zip(indices, sizes.tolist(), strict=True):
        bbx = dataset.bbx(index)
        if bbx is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in bbx)  # as crop_bbx (PIL crop) rounds
            w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            out.append(None)
            continue
        out.append(tuple(target_size(w, h, settings.image_size * s) for s in settings.scales))
    return out


def plan_batches(shapes: Sequence[object | None], batch_size: int) -> list[list[int]]:
    """Positions grouped into batches of items of equal shape (``None``: a batch of its own).

    Groups come in the order of their first item; each is cut into batches of ``batch_size``.
    """
    groups: dict[object, list[int]] = {}
    alone: list[list[int]] = []
    for position, shape in enumerate(shapes):
        if shape is None:
            alone.append([position])
        else:
            groups.setdefault(shape, []).append(position)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    return batches + alone


class _ShardBatches:
    """Batch sampler over shards: items ``(shard, index)``, each batch of one shard and one planned shape.

    A shard's headers are read when the DataLoader asks for its first batch, so planning the next
    shard overlaps with the model working on the current one.
    """

    def __init__(self, dataset: ImageListDataset, shards: Sequence[tuple[int, list[int]]],
                 settings: ExtractSettings, batch_size: int):
        self.dataset, self.shards, self.settings, self.batch_size = dataset, shards, settings, batch_size

    def __iter__(self):
        for shard, indices in self.shards:
            shapes = input_shapes(self.dataset, indices, self.settings)
            for batch in plan_batches(shapes, self.batch_size):
                yield [(shard, indices[p]) for p in batch]


class _ShardItems(torch.utils.data.Dataset):
    """``(shard, index)`` → ``(shard, index, per-scale uint8 tensors | LoadFailure)``."""

    def __init__(self, dataset: ImageListDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        shard, index = item
        loaded, _ = self.dataset[index]
        return shard, index, loaded


def collate_groups(items: list) -> dict[str, Any]:
    """DataLoader ``collate_fn`` (runs in the workers): stack the batch per scale, by actual shape.

    Returns ``{"shard", "groups": [(indices, [uint8 stack per scale])], "failures": [LoadFailure]}``;
    one group unless an image's shape differs from the planned one.
    """
    groups: dict[tuple, tuple[list[int], list[list[torch.Tensor]]]] = {}
    failures = []
    for _, index, loaded in items:
        if isinstance(loaded, LoadFailure):
            failures.append(loaded)
            continue
        key = tuple(tuple(t.shape) for t in loaded)
        indices, per_scale = groups.setdefault(key, ([], [[] for _ in loaded]))
        indices.append(index)
        for scale, t in enumerate(loaded):
            per_scale[scale].append(t)
    out = [(torch.tensor(ix), [torch.stack(ts) for ts in per_scale]) for ix, per_scale in groups.values()]
    return {"shard": items[0][0], "groups": out, "failures": failures}


class _Sums:
    """Per-scale descriptors (or their ``power``-th powers) summed per item on the model's device.

    Nothing waits for the GPU until :meth:`descriptors`, so the next batch arrives (stacked and
    pinned by the DataLoader) while the current one computes: the normalisation constants live on
    the device, and every host-to-device copy is from pinned memory (a copy from pageable memory, or
    a blocking one, would make the host wait for the stream and leave the GPU idle while the next
    batch is fetched).
    """

    def __init__(self, model: RetrievalModel, n_items: int, n_scales: int, device: torch.device, amp: str,
                 power: float | None = None, forward: torch.nn.Module | None = None, channels_last: bool = False):
        self.model, self.device, self.amp, self.n_scales, self.power = model, device, amp, n_scales, power
        self.forward = model if forward is None else forward  # the model, or its compiled form
        self.channels_last = channels_last
        self.sums = torch.zeros(n_items, model.descriptor_dim, dtype=torch.float32, device=device)
        self.mean, self.std = channel_tensors(model.mean, model.std, device)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return t.to(self.device)
        return (t if t.is_pinned() else t.pin_memory()).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def add(self, positions: torch.Tensor, x: torch.Tensor) -> None:
        """Add the descriptors of the uint8 batch ``x`` (B, 3, H, W) to the rows ``positions``."""
        x = normalize(self._to_device(x), self.mean, self.std)
        if self.channels_last:  # NHWC, as the model's convolution weights (Acceleration)
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp):
            out = self.forward(x)
        out = out.float() if self.power is None else out.float().pow(self.power)
        # one row per item in a batch: index_add_ never adds twice to a row in one call (deterministic)
        self.sums.index_add_(0, self._to_device(positions), out)

    def descriptors(self) -> torch.Tensor:
        mean = self.sums / self.n_scales
        return l2n(mean if self.power is None else mean.pow(1.0 / self.power)).cpu()


def _extract_shards(model, dataset, shards, settings, batch_size, num_workers, device, amp, bar, forward=None,
                    channels_last=False):
    """Yield ``(shard, descriptors, ok, failures)`` per shard of ``shards`` = [(shard, indices)], in order.

    One DataLoader serves all shards (workers start once); batches never span shards.
    """
    shards = [(shard, list(indices)) for shard, indices in shards]
    if not shards:
        return
    loader = DataLoader(
        _ShardItems(dataset),
        batch_sampler=_ShardBatches(dataset, shards, settings, batch_size),
        num_workers=num_workers,
        collate_fn=collate_groups,
        pin_memory=device.type == "cuda",
        # Whole batches in flight per worker: a 16-image batch at 1024 px × 3 scales is ~130 MB of
        # shared memory, so many workers hold one each (enough to keep a GPU fed), few hold two.
        prefetch_factor=(1 if num_workers >= 4 else 2) if num_workers > 0 else None,
    )
    order = dict(shards)
    power = scale_power(model, settings.scale_pool)
    current, sums, ok, failures, position = None, None, None, [], {}

    def finish():
        return current, sums.descriptors(), ok, failures

    for batch in loader:
        if batch["shard"] != current:
            if current is not None:
                yield finish()
            current = batch["shard"]
            indices = order[current]
            position = {index: p for p, index in enumerate(indices)}
            sums = _Sums(model, len(indices), len(settings.scales), device, amp, power, forward, channels_last)
            ok, failures = torch.ones(len(indices), dtype=torch.bool), []
        for f in batch["failures"]:
            failures.append(Failure(int(f.index), f.path, f.reason))
            ok[position[f.index]] = False
        n = len(batch["failures"])
        for indices, stacks in batch["groups"]:
            rows = torch.tensor([position[int(i)] for i in indices])
            for x in stacks:
                sums.add(rows, x)
            n += len(indices)
        if bar is not None:
            bar.update(n)
    if current is not None:
        yield finish()


def extract_to_store(
    model: RetrievalModel,
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    bbxs: Sequence[Sequence[float] | None] | None = None,
    settings: ExtractSettings | None = None,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    torch_threads: int | None = None,
    acceleration: Acceleration | None = None,
    device: str | torch.device | None = None,
    amp: str = "auto",
    skip_bad: bool = False,
    shard_size: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
    max_shards: int | None = None,
) -> DescriptorStore:
    """Extract descriptors of ``paths`` (cropped to ``bbxs`` where given) into a store at ``out``.

    ``batch_size``, ``num_workers`` and ``torch_threads`` left out take the device's defaults
    (:func:`dtop.engine.runtime.extraction_defaults`; logged); ``acceleration``: compile,
    channels-last, cuDNN autotuning (:class:`dtop.engine.runtime.Acceleration`, default on CUDA).
    Finished shards of a matching store are skipped (resume); a store of another model or other
    settings is an error unless ``overwrite``. Unreadable images are recorded in the manifest; the
    run then fails naming them, unless ``skip_bad`` (their rows stay zero and invalid).
    ``max_shards`` stops after that many shards (for tests of interrupted runs). Every shard this
    writer was given is written (each image a descriptor or a failure with its reason), or the run
    fails: a store is never left incomplete without an error.
    """
    check_runtime({"batch_size": batch_size, "num_workers": num_workers, "shard_size": shard_size})
    settings = settings or ExtractSettings()
    device = resolve_device(device)
    model = model.to(device).eval()
    rank, world = dist_info()
    runtime = extraction_defaults(device, batch_size, num_workers, torch_threads)
    acceleration = (acceleration or Acceleration()).resolved(device)
    if rank == 0:
        compiled = ", torch.compile" if acceleration.compile else ""
        log.info("extraction on %s: %s%s", device, runtime.describe(), compiled)
    names = [os.fsdecode(p) for p in paths]
    store_settings = {**settings_record(model, settings), "crops": _crops_digest(bbxs)}
    store = _open_store(out, names, store_settings, model_info(model), rank, shard_size, overwrite)
    shards = store.assigned_shards(rank, world)
    if max_shards is not None:
        shards = shards[:max_shards]
    transform = MultiScaleTransform(settings.image_size, settings.scales)
    dataset = ImageListDataset(names, bbxs, transform, exif_transpose=settings.exif_transpose, on_error="skip")
    work = {shard: list(store.shard_items(shard)) for shard in shards}
    bar = tqdm(total=sum(len(items) for items in work.values()), unit="img", desc=f"extract {Path(out).name}",
               disable=not progress or rank != 0, dynamic_ncols=True, smoothing=0.1)
    try:
        with intra_op_threads(runtime.torch_threads), acceleration.applied(model, device) as forward:
            for shard, descriptors, ok, failures in _extract_shards(
                model, dataset, list(work.items()), settings, runtime.batch_size, runtime.num_workers, device, amp,
                bar, forward, bool(acceleration.channels_last),
            ):
                keep = ok.nonzero().flatten()
                store.write_shard(shard, descriptors[keep], torch.tensor(work[shard])[keep], failures=failures)
    finally:
        bar.close()
    unwritten = sorted(set(shards) - set(store.finished_shards()))
    if unwritten:  # the loader ended early: never let an incomplete store pass for a finished one
        raise DataError(f"the extraction into {out} ended with {len(unwritten)} shard(s) unwritten (e.g. "
                        f"{unwritten[:5]}); run the command again to resume")
    barrier()
    if rank == 0:
        store.finalize()
    if not skip_bad:
        _fail_on_unreadable(store, Path(out))
    return store


def _open_store(out: str | os.PathLike, paths: list[str], settings: dict[str, Any], info: dict[str, Any],
                rank: int, shard_size: int, overwrite: bool) -> DescriptorStore:
    """Rank 0 creates (or reopens, to resume) the store; the other ranks open it after that."""
    if rank == 0:
        store = DescriptorStore.create(out, paths, settings, info, shard_size=shard_size, overwrite=overwrite)
    barrier()
    return store if rank == 0 else DescriptorStore.open(out)


def _fail_on_unreadable(store: DescriptorStore, out: Path) -> None:
    """Raise a DataError naming the store's unreadable images, if it has any."""
    failures = store.failures()
    if failures:
        listed = "; ".join(f"{show_path(f.path)}: {f.reason}" for f in failures[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        raise DataError(
            f"{len(failures)} image(s) could not be read: {listed}{more}. They are listed in "
            f"{out / 'manifest.json'}; fix or remove them, or rerun with --skip-bad to leave them out."
        )


def _crops_digest(bbxs: Sequence[Sequence[float] | None] | None) -> str | None:
    if bbxs is None:
        return None
    text = repr([None if b is None else [float(v) for v in b] for b in bbxs])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def extract(
    model: RetrievalModel,
    paths: Sequence[str | os.PathLike],
    bbxs: Sequence[Sequence[float] | None] | None = None,
    settings: ExtractSettings | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    amp: str = "auto",
    progress: bool = False,
    skip_bad: bool = False,
) -> torch.Tensor:
    """Descriptors (N, d) of ``paths`` in memory (no store).

    Unreadable images raise a DataError naming them, or with ``skip_bad`` get an all-zero row
    (similarity 0 to everything) and a warning. :func:`extract_with_failures` returns them instead.
    """
    descriptors, failures = extract_with_failures(model, paths, bbxs, settings, batch_size=batch_size,
                                                  num_workers=num_workers, device=device, amp=amp, progress=progress)
    if failures:
        listed = "; ".join(f"{show_path(f.path)}: {f.reason}" for f in failures[:5])
        if not skip_bad:
            raise DataError(f"could not read: {listed}")
        log.warning("%d unreadable image(s) left as zero descriptors: %s", len(failures), listed)
    return descriptors


def extract_with_failures(
    model: RetrievalModel,
    paths: Sequence[str | os.PathLike],
    bbxs: Sequence[Sequence[float] | None] | None = None,
    settings: ExtractSettings | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    amp: str = "auto",
    progress: bool = False,
) -> tuple[torch.Tensor, list[Failure]]:
    """Descriptors (N, d) of ``paths`` in memory and the images that could not be read (their rows are zero)."""
    check_runtime({"batch_size": batch_size, "num_workers": num_workers})
    settings = settings or ExtractSettings()
    device = resolve_device(device)
    model = model.to(device).eval()
    transform = MultiScaleTransform(settings.image_size, settings.scales)
    dataset = ImageListDataset([os.fsdecode(p) for p in paths], bbxs, transform,
                               exif_transpose=settings.exif_transpose, on_error="skip")
    bar = tqdm(total=len(dataset), unit="img", disable=not progress, dynamic_ncols=True)
    descriptors = torch.zeros(len(dataset), model.descriptor_dim)
    ok, failures = torch.ones(len(dataset), dtype=torch.bool), []
    if len(dataset):
        (_, descriptors, ok, failures), = list(_extract_shards(  # one shard, the loader run to its end
            model, dataset, [(0, range(len(dataset)))], settings, batch_size, num_workers, device, amp, bar
        ))
    bar.close()
    descriptors[~ok] = 0.0
    return descriptors, sorted(failures, key=lambda f: f.index)


def describe(
    model: RetrievalModel,
    image: Any,
    image_size: int = 1024,
    scales: Sequence[float] = DEFAULT_SCALES,
    bbx: Sequence[float] | None = None,
    scale_pool: ScalePool = "auto",
) -> torch.Tensor:
    """The descriptor (d,) of one image: a path or a PIL image, optionally cropped to ``bbx``."""
    from dtop.data.images import crop_bbx

    img = load_image(image) if isinstance(image, str | os.PathLike) else image.convert("RGB")
    if bbx is not None:
        img = crop_bbx(img, bbx)
    device = next(model.parameters()).device
    transform = MultiScaleTransform(image_size, scales)
    power = scale_power(model, scale_pool)
    with torch.inference_mode():
        outs = torch.stack([model(normalize(x[None].to(device), model.mean, model.std)).float().cpu()
                            for x in transform(img)])
    if power is None:
        return l2n(outs.mean(0))[0]
    return l2n(outs.pow(power).mean(0).pow(1.0 / power))[0]
