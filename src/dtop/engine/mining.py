"""Hard-negative mining and the cirtorch SfM-120k tuple protocol: tuples ``(q, p, n1 … nk)``.

:class:`TupleSampler` draws and mines an epoch's tuples, :class:`TupleBatchSampler` batches them at
one common size. The protocol, batching and distributed rules are in docs/engine.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dtop.data.images import round_to_multiple
from dtop.errors import ConfigError, DataError
from dtop.retrieval.search import search

if TYPE_CHECKING:
    from dtop.data.training import TrainingSet

Describe = Callable[[list[int]], Any]
STATE_VERSION = 1


# -------------------------------------------------------------------------------------- helpers


def _as_long(x: Any, what: str) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 1:
        raise DataError(f"{what} must be a 1-D sequence of integers, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise DataError(f"{what} must hold integers, got dtype {t.dtype}")
    return t.long()


def _as_matrix(x: Any, rows: int, what: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 2 or t.shape[0] != rows:
        raise DataError(f"{what} must be a matrix ({rows}, d), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise DataError(f"{what} must hold floating-point descriptors, got dtype {t.dtype}")
    return t


def _first_per_cluster(cand_clusters: torch.Tensor, query_clusters: torch.Tensor, k: int) -> torch.Tensor:
    """Mask ``(m, c)`` of the first ``k`` candidates per row with a new cluster ≠ the query's."""
    vals, order = torch.sort(cand_clusters, dim=1, stable=True)
    first_sorted = torch.ones_like(vals, dtype=torch.bool)
    first_sorted[:, 1:] = vals[:, 1:] != vals[:, :-1]  # stable: the first of equal values ranks best
    first = torch.zeros_like(first_sorted).scatter_(1, order, first_sorted)
    valid = first & (cand_clusters != query_clusters[:, None])
    return valid & (valid.cumsum(dim=1) <= k)


# ------------------------------------------------------------------------------------- mining


def mine_hard_negatives(
    query_descriptors: Any,
    pool_descriptors: Any,
    query_clusters: Any,
    pool_clusters: Any,
    num_negatives: int = 5,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives per query: positions ``(n_queries, num_negatives)`` (int64) in the pool.

    For each query, the pool images in order of decreasing inner product (ties: lower pool
    position first) whose cluster differs from the query's, keeping only the first image of each
    cluster (cirtorch's rule). Descriptors are (n, d) numpy/torch, L2-normalised; clusters are
    integer ids (n,). The search is the chunked exact :func:`dtop.retrieval.search.search` over a
    growing top-k (doubled for the queries that did not get enough negatives), so memory stays
    bounded. With ``return_scores`` also returns the similarities ``(n_queries, num_negatives)``.
    Raises :class:`DataError` when the pool has fewer than ``num_negatives`` clusters other than a
    query's.
    """
    k = int(num_negatives)
    if k < 1:
        raise ConfigError(f"num_negatives must be at least 1, got {num_negatives}")
    qc = _as_long(query_clusters, "query_clusters")
    pc = _as_long(pool_clusters, "pool_clusters")
    q = _as_matrix(query_descriptors, len(qc), "query_descriptors")
    pool = _as_matrix(pool_descriptors, len(pc), "pool_descriptors")
    nq, n_pool = len(qc), len(pc)
    out = torch.empty(nq, k, dtype=torch.long)
    out_scores = torch.empty(nq, k, dtype=torch.float32)
    if nq == 0:
        return (out, out_scores) if return_scores else out
    if n_pool == 0:
        raise DataError("the negative pool is empty: there is nothing to mine")
    todo = torch.arange(nq)
    width = min(n_pool, max(64, 8 * k))
    while len(todo):
        found_scores, found = search(q[todo], pool, width, chunk_size=chunk_size, device=device)
        scores, idx = torch.from_numpy(found_scores).float(), torch.from_numpy(found)
        take = _first_per_cluster(pc[idx], qc[todo], k)
        done = take.sum(dim=1) == k
        rows = todo[done]
        out[rows] = idx[done][take[done]].view(-1, k)
        out_scores[rows] = scores[done][take[done]].view(-1, k)
        todo = todo[~done]
        if len(todo) and width == n_pool:
            bad = int(todo[0])
            others = int((pc.unique() != qc[bad]).sum())
            raise DataError(
                f"query {bad} (cluster {int(qc[bad])}) can get only {others} negatives from the pool (one per "
                f"cluster other than its own) but num_negatives={k}; enlarge the pool or lower num_negatives"
            )
        width = min(n_pool, 2 * width)
    return (out, out_scores) if return_scores else out


def common_size(image_sizes: Sequence[tuple[int, int]], max_size: int = 512, multiple: int = 16) -> tuple[int, int]:
    """One ``(height, width)`` for a batch of images of sizes ``(height, width)``.

    The longer side is ``max_size``; the aspect ratio is the median (in log scale) of the images';
    both sides are rounded to multiples of ``multiple`` by :func:`~dtop.data.images.round_to_multiple`
    (halves up, at least ``multiple``).
    """
    if not image_sizes:
        raise DataError("common_size needs at least one image size")
    if int(max_size) < int(multiple) or int(max_size) % int(multiple):
        raise ConfigError(f"max_size must be a positive multiple of {multiple}, got {max_size}")
    log_ar = float(np.median([math.log(max(1, w) / max(1, h)) for h, w in image_sizes]))  # log(width / height)
    ratio = math.exp(-abs(log_ar))  # shorter / longer
    short = round_to_multiple(max_size * ratio, int(multiple))
    return (int(max_size), short) if log_ar < 0 else (short, int(max_size))


# ------------------------------------------------------------------------------------ sampler


class TupleSampler:
    """The cirtorch tuple protocol: each epoch, draw queries and a negative pool, mine, yield tuples.

    ``qidxs``/``pidxs``: image indices of the (query, positive) pairs; ``clusters``: the cluster id
    of every image (``len(clusters)`` images; the pool is drawn from all of them). Per epoch
    ``min(num_queries, len(qidxs))`` pairs (``None``: all) and ``min(pool_size, len(clusters))`` pool
    images are drawn with ``numpy.random.default_rng([seed, epoch])``, so a seed and an epoch give
    the same draw on every rank and run.

    Use: ``set_epoch(e)`` then iterate; the first iteration of an epoch mines with ``describe``
    (given here or to :meth:`mine`), a callable mapping a list of image indices to descriptors
    ``(n, d)`` of the current model. Iteration yields tuples ``(q, p, n1 … nk)`` of image indices.
    :meth:`state_dict` holds the epoch, the mined negatives and the position, so that a resumed run
    continues the epoch with the same tuples, without re-mining. Batching and distributed
    training: docs/engine.md.
    """

    def __init__(
        self,
        qidxs: Sequence[int] | np.ndarray,
        pidxs: Sequence[int] | np.ndarray,
        clusters: Sequence[int] | np.ndarray,
        num_queries: int | None = 2000,
        pool_size: int = 20000,
        num_negatives: int = 5,
        seed: int = 0,
        describe: Describe | None = None,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.qidxs = _as_long(qidxs, "qidxs")
        self.pidxs = _as_long(pidxs, "pidxs")
        self.clusters = _as_long(clusters, "clusters")
        n_images = len(self.clusters)
        if len(self.qidxs) != len(self.pidxs) or not len(self.qidxs):
            raise DataError(
                f"qidxs and pidxs must be non-empty and of equal length, got {len(self.qidxs)} and {len(self.pidxs)}"
            )
        for name, ids in (("qidxs", self.qidxs), ("pidxs", self.pidxs)):
            if int(ids.min()) < 0 or int(ids.max()) >= n_images:
                raise DataError(f"{name} must be image indices in [0, {n_images - 1}] (one cluster id per image)")
        if num_queries is not None and int(num_queries) < 1:
            raise ConfigError(f"num_queries must be positive (or None for all), got {num_queries}")
        if int(pool_size) < 1 or int(num_negatives) < 1:
            raise ConfigError(f"pool_size and num_negatives must be positive, got {pool_size} and {num_negatives}")
        if not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        n_clusters = len(self.clusters.unique())
        if n_clusters <= int(num_negatives):
            raise DataError(
                f"{n_clusters} clusters cannot give {num_negatives} negatives from other clusters per query"
            )
        self.num_queries = len(self.qidxs) if num_queries is None else min(int(num_queries), len(self.qidxs))
        self.pool_size = min(int(pool_size), n_images)
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.describe = describe
        self.rank, self.world_size = int(rank), int(world_size)
        self.chunk_size, self.device = chunk_size, device
        self.epoch = 0
        self.position = 0
        self.negatives: torch.Tensor | None = None
        self.mean_negative_distance: float | None = None

    # -- the draw
    @property
    def tuple_size(self) -> int:
        """Images per tuple: query, positive and the negatives."""
        return 2 + self.num_negatives

    def draw(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pairs, pool)`` of an epoch: positions into ``qidxs``/``pidxs`` and pool image indices."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        pairs = rng.permutation(len(self.qidxs))[: self.num_queries]
        pool = rng.permutation(len(self.clusters))[: self.pool_size]
        return torch.from_numpy(pairs).long(), torch.from_numpy(pool).long()

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (a new draw, negatives mined on first use); same epoch: no change."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.position = 0
            self.negatives = None
            self.mean_negative_distance = None

    # -- mining
    def mine(self, describe: Describe | None = None) -> torch.Tensor:
        """Mine this epoch's negatives with ``describe`` (or the one given at construction).

        Returns and stores :attr:`negatives`: image indices ``(num_queries, num_negatives)``.
        """
        describe = describe or self.describe
        if describe is None:
            raise ConfigError("TupleSampler needs a describe(image_indices) callable to mine negatives")
        pairs, pool = self.draw()
        queries = self.qidxs[pairs]
        qvecs = _as_matrix(describe(queries.tolist()), len(queries), "descriptors of the queries")
        pvecs = _as_matrix(describe(pool.tolist()), len(pool), "descriptors of the pool")
        positions, scores = mine_hard_negatives(
            qvecs,
            pvecs,
            self.clusters[queries],
            self.clusters[pool],
            self.num_negatives,
            chunk_size=self.chunk_size,
            device=self.device,
            return_scores=True,
        )
        self.negatives = pool[positions]
        # distance of L2-normalised vectors from their inner product (cirtorch's statistic)
        self.mean_negative_distance = float((2.0 - 2.0 * scores.double()).clamp(min=0).sqrt().mean())
        self.position = 0
        return self.negatives

    # -- the tuples
    def tuples(self) -> list[tuple[int, ...]]:
        """All tuples ``(q, p, n1 … nk)`` of the epoch (every rank's), in iteration order."""
        negatives = self.mine() if self.negatives is None else self.negatives
        pairs, _ = self.draw()
        table = torch.cat([self.qidxs[pairs, None], self.pidxs[pairs, None], negatives], dim=1)
        return [tuple(row) for row in table.tolist()]

    def __len__(self) -> int:
        return self.num_queries // self.world_size

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        mine = self.tuples()[self.rank :: self.world_size][: len(self)]
        if self.position >= len(mine):  # a finished epoch iterated again: a new pass, same tuples
            self.position = 0
        while self.position < len(mine):
            item = mine[self.position]
            self.position += 1
            yield item

    # -- resume
    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Epoch, negatives and position; ``position`` overrides the count of yielded tuples.

        With a DataLoader that prefetches, the sampler runs ahead of training: pass the number of
        tuples this rank has consumed.
        """
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position if position is None else int(position),
            "negatives": None if self.negatives is None else self.negatives.clone(),
            "mean_negative_distance": self.mean_negative_distance,
            "num_queries": self.num_queries,
            "pool_size": self.pool_size,
            "num_negatives": self.num_negatives,
            "num_pairs": len(self.qidxs),
            "num_images": len(self.clusters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the sampler must be built on the same data and settings."""
        for key, mine in (
            ("num_pairs", len(self.qidxs)),
            ("num_images", len(self.clusters)),
            ("num_queries", self.num_queries),
            ("pool_size", self.pool_size),
            ("num_negatives", self.num_negatives),
            ("seed", self.seed),
        ):
            if int(state.get(key, -1)) != mine:
                raise ConfigError(
                    f"the saved tuple sampler has {key}={state.get(key)} but this one has {mine}; resume with "
                    "the same training set and sampling settings"
                )
        negatives = state["negatives"]
        if negatives is not None:
            negatives = torch.as_tensor(negatives).long().cpu()
            if negatives.shape != (self.num_queries, self.num_negatives):
                raise ConfigError(
                    f"the saved negatives have shape {tuple(negatives.shape)}, expected "
                    f"{(self.num_queries, self.num_negatives)}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.negatives = negatives
        self.mean_negative_distance = state.get("mean_negative_distance")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pairs={len(self.qidxs)}, images={len(self.clusters)}, "
            f"num_queries={self.num_queries}, pool_size={self.pool_size}, num_negatives={self.num_negatives}, "
            f"seed={self.seed}, epoch={self.epoch}, rank={self.rank}/{self.world_size})"
        )


# ------------------------------------------------------------------------------ batches of tuples


def pairs_from_labels(labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, positive) pairs for a labelled set without given tuples (a folder or CSV dataset).

    Every image of a class with at least two images is a query; its positive is the next image of
    its class (cyclically, in dataset order), so each pair is deterministic and every such image
    is a positive once. Returns ``(qidxs, pidxs)`` int64 arrays.
    """
    ids = np.asarray(labels, dtype=np.int64).reshape(-1)
    order = np.argsort(ids, kind="stable")
    sorted_labels = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    qidxs, pidxs = [], []
    for s, e in zip(starts, ends, strict=True):
        if e - s < 2:
            continue
        members = order[s:e]
        qidxs.append(members)
        pidxs.append(np.roll(members, -1))
    if not qidxs:
        raise DataError("no class has two images: the contrastive protocol needs (query, positive) pairs")
    return np.concatenate(qidxs), np.concatenate(pidxs)


def training_pairs(training_set: TrainingSet) -> tuple[np.ndarray, np.ndarray]:
    """The (query, positive) pairs of a training set: its own (SfM-120k ``qidxs``/``pidxs``), else
    :func:`pairs_from_labels` of its labels."""
    extras = training_set.extras
    if "qidxs" in extras and "pidxs" in extras:
        return np.asarray(extras["qidxs"], dtype=np.int64), np.asarray(extras["pidxs"], dtype=np.int64)
    return pairs_from_labels(training_set.labels)


class TupleBatchSampler:
    """Batches of ``tuples_per_batch`` tuples of a :class:`TupleSampler`, at one common size each.

    Yields, like :class:`dtop.data.sampler.GroupSizeBatchSampler`, lists ``[(image, (H, W)), …]``
    for :class:`dtop.data.training.TrainDataset`: the images of the batch's tuples in tuple order,
    all at :func:`common_size` of their sizes (``image_sizes`` is ``(N, 2)`` width, height) with the
    longer side ``train_size``. A partial last batch is dropped. ``set_epoch``, ``state_dict``
    (``batches_done``) and ``load_state_dict`` delegate to the tuple sampler, whose state holds the
    epoch's mined negatives, so a resumed run continues with the same tuples without re-mining.
    """

    kind = "tuples"

    def __init__(self, tuples: TupleSampler, tuples_per_batch: int, image_sizes: Any, train_size: int) -> None:
        if int(tuples_per_batch) < 1:
            raise ConfigError(f"tuples_per_batch must be at least 1, got {tuples_per_batch}")
        sizes = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
        if len(sizes) != len(tuples.clusters):
            raise DataError(f"{len(sizes)} image sizes for {len(tuples.clusters)} images")
        self.tuples = tuples
        self.tuples_per_batch = int(tuples_per_batch)
        self.sizes = sizes
        self.train_size = int(train_size)

    @property
    def tuple_size(self) -> int:
        """Images per tuple."""
        return self.tuples.tuple_size

    def __len__(self) -> int:
        return len(self.tuples) // self.tuples_per_batch

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (negatives are mined again on first use)."""
        self.tuples.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, int]]]]:
        n = len(self) * self.tuples_per_batch  # tuples in whole batches
        if self.tuples.position >= n:  # resumed at the end of an epoch: nothing left of it
            return
        batch: list[tuple[int, ...]] = []
        for item in self.tuples:
            if self.tuples.position > n:
                break
            batch.append(item)
            if len(batch) == self.tuples_per_batch:
                images = [i for t in batch for i in t]
                size = common_size([(int(self.sizes[i, 1]), int(self.sizes[i, 0])) for i in images], self.train_size)
                yield [(int(i), size) for i in images]
                batch = []

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """The tuple sampler's state, positioned after ``batches_done`` batches when given."""
        position = None if batches_done is None else int(batches_done) * self.tuples_per_batch
        return {"kind": self.kind, "tuples_per_batch": self.tuples_per_batch, "train_size": self.train_size,
                "tuples": self.tuples.state_dict(position=position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped."""
        for key in ("kind", "tuples_per_batch", "train_size"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"cannot resume the tuple sampler: it was saved with {key}={state.get(key)!r}, this run has "
                    f"{getattr(self, key)!r}; resume with the same settings"
                )
        self.tuples.load_state_dict(state["tuples"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tuples!r}, tuples_per_batch={self.tuples_per_batch})"
