"""Tests of dtop.engine.mining: hard negatives and the SfM-120k tuple sampler."""

import numpy as np
import pytest
import torch

from dtop.engine.mining import TupleSampler, common_size, mine_hard_negatives
from dtop.errors import ConfigError, DataError
from dtop.retrieval.search import search


def unit(rows, dim, rng):
    x = rng.standard_normal((rows, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(q, pool, qc, pc, k):
    """cirtorch's loop: walk the full ranking, one negative per new cluster ≠ the query's."""
    out = []
    for i in range(len(q)):
        order = np.argsort(-(pool @ q[i]), kind="stable")
        seen, row = {qc[i]}, []
        for j in order:
            if pc[j] not in seen:
                row.append(j)
                seen.add(pc[j])
                if len(row) == k:
                    break
        out.append(row)
    return np.array(out)


def check_rules(neg, qc, pc):
    for i, row in enumerate(neg):
        clusters = [pc[j] for j in row]
        assert qc[i] not in clusters
        assert len(set(clusters)) == len(clusters)


@pytest.mark.parametrize("chunk_size", [None, 17])
def test_mining_matches_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    q, pool = unit(40, 12, rng), unit(300, 12, rng)
    qc, pc = rng.integers(0, 30, 40), rng.integers(0, 30, 300)
    neg, scores = mine_hard_negatives(q, pool, qc, pc, 5, chunk_size=chunk_size, return_scores=True)
    assert neg.dtype == torch.long and neg.shape == (40, 5)
    expected = brute_force(q, pool, qc, pc, 5)
    np.testing.assert_array_equal(neg.numpy(), expected)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(q @ pool.T, expected, 1), rtol=1e-5, atol=1e-6)
    check_rules(neg.numpy(), qc, pc)


def test_mining_widens_the_search_when_one_cluster_crowds_the_top(monkeypatch):
    import dtop.engine.mining as mining

    widths = []

    def counting_search(queries, database, topk, **kwargs):
        widths.append((len(queries), topk))
        return search(queries, database, topk, **kwargs)

    monkeypatch.setattr(mining, "search", counting_search)
    rng = np.random.default_rng(1)
    # 250 near-duplicates of one direction in cluster 0, 50 others in clusters 1..10; queries of
    # cluster 0 point there too: their first ~250 neighbours are all of their own cluster
    centre = unit(1, 16, rng)
    crowd = centre + 0.05 * rng.standard_normal((250, 16))
    pool = np.concatenate([crowd, unit(50, 16, rng)])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    pc = np.concatenate([np.zeros(250, int), 1 + np.arange(50) % 10])
    q = centre + 0.05 * rng.standard_normal((6, 16))
    q = np.concatenate([q[:3], -centre, q[3:], unit(1, 16, rng)])  # two queries away from the crowd
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    qc = np.array([0, 0, 0, 5, 0, 3, 4, 0])
    neg = mine_hard_negatives(torch.from_numpy(q).float(), torch.from_numpy(pool).float(), qc, pc, 5)
    np.testing.assert_array_equal(neg.numpy(), brute_force(q.astype(np.float32), pool.astype(np.float32), qc, pc, 5))
    check_rules(neg.numpy(), qc, pc)
    assert widths == [(8, 64), (6, 128), (6, 256)]  # the crowd fills the first 250 places of six queries
    with pytest.raises(DataError, match="num_negatives"):
        mine_hard_negatives(q, pool, qc, pc, 11)  # every query has only 10 clusters besides its own
    with pytest.raises(ConfigError):
        mine_hard_negatives(q, pool, qc, pc, 0)


def make_sampler(seed=0, **kwargs):
    rng = np.random.default_rng(123)
    n_images = 400
    clusters = rng.integers(0, 40, n_images)
    qidxs = rng.choice(n_images, 60, replace=False)
    pidxs = [int(rng.choice(np.flatnonzero(clusters == clusters[i]))) for i in qidxs]
    table = torch.from_numpy(unit(n_images, 8, rng)).float()
    calls = []

    def describe(indices):
        calls.append(list(indices))
        return table[torch.tensor(indices)]

    options = {"num_queries": 20, "pool_size": 150, "num_negatives": 3, "seed": seed, "describe": describe}
    options.update(kwargs)
    sampler = TupleSampler(qidxs.tolist(), pidxs, clusters.tolist(), **options)
    return sampler, calls, clusters, table


def test_tuple_sampler_is_deterministic_for_seed_and_epoch():
    a, calls, clusters, _ = make_sampler(seed=3)
    b, _, _, _ = make_sampler(seed=3)
    for s in (a, b):
        s.set_epoch(2)
    tuples = list(a)
    assert tuples == list(b)
    assert len(tuples) == len(a) == 20 and all(len(t) == a.tuple_size == 5 for t in tuples)
    assert len(calls) == 2 and len(calls[0]) == 20 and len(calls[1]) == 150  # queries, then the pool
    assert a.mean_negative_distance is not None and 0 < a.mean_negative_distance < 2
    pairs = set(zip(a.qidxs.tolist(), a.pidxs.tolist()))
    for q, p, *negs in tuples:
        assert (q, p) in pairs
        assert clusters[q] not in {clusters[n] for n in negs}
        assert len({clusters[n] for n in negs}) == len(negs)
        assert set(negs) <= set(calls[1])  # negatives come from the pool
    # a second pass over the same epoch: same tuples, no re-mining
    assert list(a) == tuples and len(calls) == 2
    a.set_epoch(3)
    assert list(a) != tuples and len(calls) == 4
    c, _, _, _ = make_sampler(seed=4)
    c.set_epoch(2)
    assert list(c) != tuples


def test_tuple_sampler_resumes_mid_epoch_without_re_mining():
    a, _, _, _ = make_sampler()
    a.set_epoch(1)
    it = iter(a)
    head = [next(it) for _ in range(7)]
    state = a.state_dict()
    rest = list(it)

    def fail(indices):
        raise AssertionError("a resumed epoch must not re-mine")

    b, _, _, _ = make_sampler(describe=fail)
    b.load_state_dict(state)
    b.set_epoch(1)  # the trainer's loop calls it again: same epoch, no change
    assert list(b) == rest and head + rest == a.tuples()
    c, _, _, _ = make_sampler(describe=fail)
    c.load_state_dict(a.state_dict(position=3))  # the consumed count overrides the sampler's
    assert list(c) == (head + rest)[3:]
    d, _, _, _ = make_sampler(num_negatives=2)
    with pytest.raises(ConfigError, match="num_negatives"):
        d.load_state_dict(state)


def test_tuple_sampler_shards_ranks_disjointly():
    full, _, _, _ = make_sampler(num_queries=21)
    everything = full.tuples()
    shards = []
    for rank in range(2):
        s, _, _, _ = make_sampler(num_queries=21, rank=rank, world_size=2)
        assert len(s) == 10
        shards.append(list(s))
    assert shards[0] == everything[0:20:2] and shards[1] == everything[1:20:2]


def test_tuple_sampler_validation_and_repr():
    with pytest.raises(DataError):
        TupleSampler([0, 1], [1], [0, 0, 1])
    with pytest.raises(DataError):
        TupleSampler([0, 5], [1, 2], [0, 0, 1])
    with pytest.raises(DataError, match="clusters"):
        TupleSampler([0], [1], [0, 0, 1, 2], num_negatives=3)
    s = TupleSampler([0], [1], [0, 0, 1, 2], num_negatives=2)
    with pytest.raises(ConfigError, match="describe"):
        list(s)
    assert "num_negatives=2" in repr(s)


def test_common_size():
    assert common_size([(300, 400), (600, 800)], 512) == (384, 512)  # landscape 3:4
    assert common_size([(800, 600)], 512) == (512, 384)  # portrait
    assert common_size([(100, 100), (100, 300), (300, 100)], 512) == (512, 512)
    h, w = common_size([(10, 4000)], 512)
    assert (h, w) == (16, 512)
    with pytest.raises(ConfigError):
        common_size([(1, 1)], 500)
