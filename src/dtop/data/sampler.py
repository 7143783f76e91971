"""Batch samplers for training: group-size sampling (Yokoo et al. 2020) and fixed square batches.

Both are ``batch_sampler``\\ s of a :class:`torch.utils.data.DataLoader`: each batch is a list
``[(index, (H, W)), ...]`` with one common size. An epoch is deterministic for ``(seed, epoch)``,
split into disjoint, equally long parts for the ranks, and resumable mid-epoch
(:meth:`~GroupSizeBatchSampler.state_dict`). ``docs/data.md`` describes the buckets and the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dtop.data.images import MULTIPLE, round_to_multiple
from dtop.errors import CheckpointError, DataError

_LANDSCAPE_EDGES = (1.12, 1.29, 1.41, 1.63, 1.89, 2.45)
DEFAULT_BUCKET_EDGES: tuple[float, ...] = (
    *(round(1.0 / e, 4) for e in reversed(_LANDSCAPE_EDGES)),
    *_LANDSCAPE_EDGES,
)
"""Aspect-ratio (w/h) bucket edges: geometric midpoints between 1:1, 5:4, 4:3, 3:2, 16:9, 2:1, 3:1
(landscape) and their reciprocals (portrait): 13 buckets."""

def bucket_size(aspect: float, train_size: int, max_aspect: float = 4.0) -> tuple[int, int]:
    """``(H, W)`` of a bucket of aspect ratio ``aspect`` = w/h: longer side ``train_size``, shorter rounded to 16."""
    a = min(max(float(aspect), 1.0 / max_aspect), max_aspect)
    if a >= 1.0:
        return round_to_multiple(train_size / a), int(train_size)
    return int(train_size), round_to_multiple(train_size * a)


def _clean_ratios(aspect_ratios: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(aspect_ratios, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(a) | (a <= 0)
    if bad.any():
        a = a.copy()
        a[bad] = 1.0
    return a


class _BucketBatchSampler:
    """Shared epoch logic of the samplers: groups of images, each with one (H, W)."""

    kind = "base"

    def __init__(
        self,
        aspect_ratios: Sequence[float] | np.ndarray,
        batch_size: int,
        train_size: int = 512,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        self.aspect_ratios = _clean_ratios(aspect_ratios)
        self.num_samples = int(self.aspect_ratios.size)
        self.batch_size = int(batch_size)
        self.train_size = int(train_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        if self.num_samples == 0:
            raise DataError("the sampler got no images")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if self.train_size < MULTIPLE or self.train_size % MULTIPLE:
            raise DataError(f"train_size must be a positive multiple of {MULTIPLE}, got {train_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if self.seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.epoch = 0
        self._resume_at = 0  # batches of self.epoch to skip at the next iteration (set by load_state_dict)
        self._position = 0  # batches of self.epoch handed out so far
        self._cache: tuple[int, list[np.ndarray], list[int]] | None = None
        # Subclasses set: self.groups (list of index arrays), self.sizes (list of (H, W)).
        self.groups: list[np.ndarray] = []
        self.sizes: list[tuple[int, int]] = []

    def _check_len(self) -> None:
        if len(self) == 0:
            raise DataError(
                f"{self.num_samples} images give no batch of {self.batch_size} per rank for {self.world_size} "
                "rank(s); use a smaller batch size, drop_last=False, or more images"
            )

    # ------------------------------------------------------------------ epoch plan

    def _num_global_batches(self) -> int:
        counts = [g.size for g in self.groups]
        if self.drop_last:
            b = sum(n // self.batch_size for n in counts)
            return b - b % self.world_size
        b = sum(-(-n // self.batch_size) for n in counts)
        return -(-b // self.world_size) * self.world_size

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        return self._num_global_batches() // self.world_size

    def epoch_batches(self, epoch: int | None = None) -> tuple[list[np.ndarray], list[int]]:
        """All ranks' batches of ``epoch`` (default: the current one): index arrays and their group ids."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x6D5]))
        batches: list[np.ndarray] = []
        gids: list[int] = []
        bs = self.batch_size
        for gid, group in enumerate(self.groups):
            idx = group[rng.permutation(group.size)]
            full = idx.size // bs
            for i in range(full):
                batches.append(idx[i * bs:(i + 1) * bs])
                gids.append(gid)
            if idx.size % bs and not self.drop_last:
                batches.append(idx[full * bs:])
                gids.append(gid)
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        gids = [gids[i] for i in order]
        w = self.world_size
        if len(batches) % w:
            if self.drop_last:
                keep = len(batches) - len(batches) % w
                batches, gids = batches[:keep], gids[:keep]
            else:
                pad = 0
                while len(batches) % w:
                    sizes = [b.size for b in batches]
                    j = int(np.argmax(sizes))
                    if sizes[j] >= 2:  # split the largest batch: no image repeated
                        half = -(-sizes[j] // 2)
                        batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
                        gids[j:j + 1] = [gids[j], gids[j]]
                    else:  # too few images to split: repeat batches (padding)
                        batches.append(batches[pad % len(batches)])
                        gids.append(gids[pad % len(gids)])
                        pad += 1
        self._cache = (epoch, batches, gids)
        return batches, gids

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        start, self._resume_at = self._resume_at, 0
        batches, gids = self.epoch_batches(self.epoch)
        self._position = start
        mine = range(self.rank, len(batches), self.world_size)
        for b in mine[start:]:
            size = self.sizes[gids[b]]
            self._position += 1
            yield [(int(i), size) for i in batches[b]]

    # ------------------------------------------------------------------ epochs and resuming

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch``; a new epoch starts at its first batch."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._resume_at = 0
            self._position = 0
        self.epoch = epoch

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Position in the epoch (plain values).

        ``batches_done``: the batches of this epoch this rank has consumed (default: those handed out).
        """
        done = self._position if batches_done is None else int(batches_done)
        if not 0 <= done <= len(self):
            raise DataError(f"batches_done must lie in 0..{len(self)}, got {done}")
        return {
            "kind": self.kind,
            "epoch": int(self.epoch),
            "batches_done": done,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "train_size": self.train_size,
            "drop_last": self.drop_last,
            "num_samples": self.num_samples,
            "num_batches": len(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped: the next iteration yields the rest of its epoch."""
        for key in ("kind", "seed", "world_size", "batch_size", "train_size", "drop_last", "num_samples"):
            if key in state and state[key] != getattr(self, key):
                raise CheckpointError(
                    f"cannot resume the sampler: it was saved with {key}={state[key]!r}, this run has "
                    f"{key}={getattr(self, key)!r} (resume with the same data, batch size, seed and number of ranks)"
                )
        done = int(state.get("batches_done", 0))
        if not 0 <= done <= len(self):
            raise CheckpointError(f"cannot resume the sampler: batches_done={done} is not in 0..{len(self)}")
        self.epoch = int(state.get("epoch", 0))
        self._resume_at = done
        self._position = done

    # ------------------------------------------------------------------ reporting

    def describe(self) -> list[dict[str, Any]]:
        """One dict per group: size (H, W), number of images, aspect-ratio range and median."""
        out = []
        for g, (h, w) in zip(self.groups, self.sizes):
            a = self.aspect_ratios[g]
            out.append({"size": (h, w), "images": int(g.size), "aspect_min": float(a.min()),
                        "aspect_median": float(np.median(a)), "aspect_max": float(a.max())})
        return out

    def size_of(self) -> np.ndarray:
        """``(N, 2)`` int64 (H, W) each image is trained at."""
        out = np.zeros((self.num_samples, 2), dtype=np.int64)
        for g, size in zip(self.groups, self.sizes):
            out[g] = size
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(images={self.num_samples}, groups={len(self.groups)}, "
                f"batch_size={self.batch_size}, train_size={self.train_size}, rank={self.rank}/{self.world_size}, "
                f"drop_last={self.drop_last}, batches={len(self)})")


class GroupSizeBatchSampler(_BucketBatchSampler):
    """Group-size sampling: batches of images of similar aspect ratio at one common size (docs/data.md).

    ``bucket_edges``: increasing aspect-ratio (w/h) edges (default :data:`DEFAULT_BUCKET_EDGES`).
    ``min_bucket_size``: smaller buckets merge into their nearest neighbour (default ``batch_size``).
    ``max_aspect``: bucket shapes are clamped to this aspect ratio (either orientation).
    """

    kind = "group-size"

    def __init__(
        self,
        aspect_ratios: Sequence[float] | np.ndarray,
        batch_size: int,
        train_size: int = 512,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        bucket_edges: Sequence[float] | None = None,
        min_bucket_size: int | None = None,
        max_aspect: float = 4.0,
    ) -> None:
        super().__init__(aspect_ratios, batch_size, train_size, seed, rank, world_size, drop_last)
        edges = np.asarray(DEFAULT_BUCKET_EDGES if bucket_edges is None else bucket_edges, dtype=np.float64)
        if edges.ndim != 1 or (edges.size and (np.any(edges <= 0) or np.any(np.diff(edges) <= 0))):
            raise DataError(f"bucket_edges must be increasing positive aspect ratios, got {list(edges)}")
        if max_aspect < 1:
            raise DataError(f"max_aspect must be >= 1, got {max_aspect}")
        self.bucket_edges = tuple(float(e) for e in edges)
        self.max_aspect = float(max_aspect)
        self.min_bucket_size = self.batch_size if min_bucket_size is None else int(min_bucket_size)
        bucket = np.searchsorted(edges, self.aspect_ratios, side="right")
        groups = [np.flatnonzero(bucket == b) for b in range(edges.size + 1)]
        groups = [g for g in groups if g.size]
        self.groups = self._merge_small(groups)
        self.sizes = [
            bucket_size(float(np.median(self.aspect_ratios[g])), self.train_size, self.max_aspect) for g in self.groups
        ]
        self._check_len()

    def _merge_small(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        """Merge buckets smaller than ``min_bucket_size`` into the neighbour of closest median log-aspect."""
        groups = list(groups)
        log_a = np.log(self.aspect_ratios)
        while len(groups) > 1:
            sizes = [g.size for g in groups]
            j = int(np.argmin(sizes))
            if sizes[j] >= self.min_bucket_size:
                break
            med = [float(np.median(log_a[g])) for g in groups]
            neighbours = [k for k in (j - 1, j + 1) if 0 <= k < len(groups)]
            k = min(neighbours, key=lambda n: (abs(med[n] - med[j]), n))
            merged = np.sort(np.concatenate([groups[j], groups[k]]))
            lo = min(j, k)
            groups[lo:lo + 2] = [merged]
        return groups


class FixedSizeBatchSampler(_BucketBatchSampler):
    """The baseline: every image resized to ``train_size × train_size``; same interface and epoch rules."""

    kind = "square"

    def __init__(
        self,
        aspect_ratios: Sequence[float] | np.ndarray,
        batch_size: int,
        train_size: int = 512,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        **_ignored: Any,
    ) -> None:
        super().__init__(aspect_ratios, batch_size, train_size, seed, rank, world_size, drop_last)
        self.groups = [np.arange(self.num_samples, dtype=np.int64)]
        self.sizes = [(self.train_size, self.train_size)]
        self._check_len()
