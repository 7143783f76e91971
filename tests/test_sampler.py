"""Batch samplers: group-size sampling (Yokoo et al. 2020) and the fixed square baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dtop.data.images import round_to_multiple
from dtop.data.sampler import (
    DEFAULT_BUCKET_EDGES,
    FixedSizeBatchSampler,
    GroupSizeBatchSampler,
    bucket_size,
)
from dtop.errors import CheckpointError, DataError


def _ratios(n: int = 1000, seed: int = 0) -> np.ndarray:
    """A photo-like mix: 4:3, 3:4, 16:9, 1:1, 3:2 and some panoramas, with a little spread."""
    rng = np.random.default_rng(seed)
    base = rng.choice([4 / 3, 3 / 4, 16 / 9, 1.0, 3 / 2, 2 / 3, 3.2], size=n, p=[.4, .25, .1, .08, .08, .05, .04])
    return base * np.exp(rng.normal(0, 0.02, n))


def _epoch(sampler_cls, ratios, world, epoch=0, **kw):
    """Batches of every rank for one epoch: list (per rank) of lists of batches."""
    out = []
    for rank in range(world):
        s = sampler_cls(ratios, rank=rank, world_size=world, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


@pytest.mark.parametrize("cls", [GroupSizeBatchSampler, FixedSizeBatchSampler])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_exactly_once_across_ranks(cls, world):
    ratios = _ratios(1003)
    per_rank = _epoch(cls, ratios, world, batch_size=16, train_size=256, drop_last=False, seed=3)
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank (DDP)
    seen = [i for batches in per_rank for batch in batches for i, _ in batch]
    assert sorted(seen) == list(range(len(ratios)))  # exactly once, nothing repeated
    rank_sets = [{i for batch in batches for i, _ in batch} for batches in per_rank]
    for a, b in itertools.combinations(rank_sets, 2):
        assert not a & b


@pytest.mark.parametrize("cls", [GroupSizeBatchSampler, FixedSizeBatchSampler])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_drop_last_drops_little_and_repeats_nothing(cls, world):
    ratios = _ratios(1003)
    bs = 16
    per_rank = _epoch(cls, ratios, world, batch_size=bs, train_size=256, drop_last=True, seed=3)
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for batch in batches for i, _ in batch]
    assert len(seen) == len(set(seen))  # at most once
    assert all(len(batch) == bs for batches in per_rank for batch in batches)  # only full batches
    s = cls(ratios, batch_size=bs, train_size=256, world_size=world, drop_last=True)
    n_groups = len(s.groups)
    assert len(ratios) - len(seen) <= n_groups * (bs - 1) + (world - 1) * bs
    # Different images are dropped in another epoch, so every image is used over a few epochs.
    used = set(seen)
    for e in range(1, 6):
        used |= {i for batches in _epoch(cls, ratios, world, e, batch_size=bs, train_size=256, seed=3)
                 for batch in batches for i, _ in batch}
    assert len(used) == len(ratios)


def test_one_size_per_batch_longer_side_train_size_and_aspect_close():
    ratios = _ratios(2000)
    s = GroupSizeBatchSampler(ratios, batch_size=8, train_size=512)
    errors = []
    for batch in s:
        sizes = {size for _, size in batch}
        assert len(sizes) == 1
        (h, w), = sizes
        assert max(h, w) == 512 and h % 16 == 0 and w % 16 == 0
        for i, _ in batch:
            errors.append(abs(np.log(ratios[i] / (w / h))))
    # Buckets are narrow: no image is stretched by more than ~15 % (the panorama bucket is the widest).
    assert np.max(errors) < np.log(1.15)
    assert np.mean(errors) < 0.03


def test_bucket_shapes():
    assert round_to_multiple(383.9) == 384 and round_to_multiple(3) == 16
    assert bucket_size(4 / 3, 512) == (384, 512)
    assert bucket_size(3 / 4, 512) == (512, 384)
    assert bucket_size(16 / 9, 512) == (288, 512)
    assert bucket_size(1.0, 512) == (512, 512)
    assert bucket_size(20.0, 512) == (128, 512)  # clamped to max_aspect 4
    assert len(DEFAULT_BUCKET_EDGES) == 12 and list(DEFAULT_BUCKET_EDGES) == sorted(DEFAULT_BUCKET_EDGES)


def test_small_buckets_are_merged_so_no_image_starves():
    ratios = np.concatenate([np.full(100, 4 / 3), np.full(3, 3.5), np.full(2, 0.3)])
    s = GroupSizeBatchSampler(ratios, batch_size=8, train_size=256)
    assert all(g.size >= 8 for g in s.groups)
    assert sorted(np.concatenate(s.groups).tolist()) == list(range(len(ratios)))


@pytest.mark.parametrize("cls", [GroupSizeBatchSampler, FixedSizeBatchSampler])
def test_order_depends_on_seed_and_epoch_only(cls):
    ratios = _ratios(500)
    a = cls(ratios, batch_size=8, seed=1)
    b = cls(ratios, batch_size=8, seed=1)
    np.random.seed(123)  # global RNG state must not matter
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again gives the same epoch
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(2)
    assert list(a) != first
    assert list(cls(ratios, batch_size=8, seed=2)) != list(cls(ratios, batch_size=8, seed=1))
    assert len(a) == len(first)  # the same number of batches every epoch


@pytest.mark.parametrize("cls", [GroupSizeBatchSampler, FixedSizeBatchSampler])
@pytest.mark.parametrize("world", [1, 3])
def test_resume_mid_epoch_gives_the_remaining_batches(cls, world):
    ratios = _ratios(700)
    for rank in range(world):
        ref = cls(ratios, batch_size=8, seed=5, rank=rank, world_size=world)
        ref.set_epoch(4)
        full = list(ref)
        run = cls(ratios, batch_size=8, seed=5, rank=rank, world_size=world)
        run.set_epoch(4)
        it = iter(run)
        done = [next(it) for _ in range(7)]
        state = run.state_dict()
        assert state["epoch"] == 4 and state["batches_done"] == 7
        resumed = cls(ratios, batch_size=8, seed=5, rank=rank, world_size=world)
        resumed.set_epoch(0)
        resumed.load_state_dict(state)
        resumed.set_epoch(4)  # same epoch again: still resumes
        rest = list(resumed)
        assert done + rest == full
        # the next epoch starts from its beginning
        resumed.set_epoch(5)
        ref.set_epoch(5)
        assert list(resumed) == list(ref)


def test_state_dict_with_consumed_count_and_plain_types():
    ratios = _ratios(300)
    s = GroupSizeBatchSampler(ratios, batch_size=8)
    it = iter(s)
    for _ in range(10):  # a DataLoader's workers fetched 10 batches ...
        next(it)
    state = s.state_dict(batches_done=6)  # ... the loop consumed 6
    assert state["batches_done"] == 6
    assert all(isinstance(v, int | str | bool) for v in state.values())
    r = GroupSizeBatchSampler(ratios, batch_size=8)
    r.load_state_dict(state)
    assert list(r) == list(GroupSizeBatchSampler(ratios, batch_size=8))[6:]


def test_load_state_dict_refuses_another_setup():
    ratios = _ratios(300)
    state = GroupSizeBatchSampler(ratios, batch_size=8, seed=1).state_dict()
    with pytest.raises(CheckpointError, match="seed"):
        GroupSizeBatchSampler(ratios, batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="world_size"):
        GroupSizeBatchSampler(ratios, batch_size=8, seed=1, world_size=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="kind"):
        FixedSizeBatchSampler(ratios, batch_size=8, seed=1).load_state_dict(state)


def test_fixed_size_sampler_is_square():
    s = FixedSizeBatchSampler(_ratios(100), batch_size=10, train_size=320)
    assert {size for batch in s for _, size in batch} == {(320, 320)}
    assert len(s) == 10


def test_bad_arguments():
    with pytest.raises(DataError, match="train_size"):
        GroupSizeBatchSampler(_ratios(10), batch_size=2, train_size=500)
    with pytest.raises(DataError, match="rank"):
        GroupSizeBatchSampler(_ratios(10), batch_size=2, rank=2, world_size=2)
    with pytest.raises(DataError, match="no batch"):
        GroupSizeBatchSampler(_ratios(10), batch_size=8, world_size=4)
    # Unknown sizes (0 or NaN ratios) count as square rather than failing.
    s = GroupSizeBatchSampler(np.array([0.0, np.nan, 1.0, 1.0]), batch_size=2, train_size=64)
    assert {size for batch in s for _, size in batch} == {(64, 64)}


def test_tiny_set_without_drop_last_pads_by_repeating():
    # 2 images, 3 ranks: not enough images to split batches, so one batch is repeated.
    per_rank = _epoch(GroupSizeBatchSampler, np.array([1.0, 1.0]), 3, batch_size=4, train_size=64,
                      drop_last=False)
    assert [len(b) for b in per_rank] == [1, 1, 1]
    seen = {i for batches in per_rank for batch in batches for i, _ in batch}
    assert seen == {0, 1}
