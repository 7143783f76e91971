"""Post-processing: αQE / αDBA against dense reference code, whitening, the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtop.errors import CheckpointError, ConfigError, DataError
from dtop.retrieval.postprocess import (
    DatabaseAugmentation,
    PostProcessing,
    QueryExpansion,
    Whiten,
    Whitening,
    alpha_database_augmentation,
    alpha_query_expansion,
    fit_learned_whitening,
    fit_pca_whitening,
    load_whitening,
    save_whitening,
)


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def clustered(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Unit vectors around a few centres, so that neighbourhoods have positive similarities."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g)
    x = centres[torch.randint(0, 6, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=1)


# ------------------------------------------------------------------------ dense reference code


def ref_qe(q: np.ndarray, x: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Query + its k-1 nearest database vectors, weights max(s, 0)^alpha; ties by lower index."""
    s = q @ x.T
    out = np.empty_like(q)
    for i in range(len(q)):
        nn = np.argsort(-s[i], kind="stable")[: k - 1]
        v = q[i] + (np.clip(s[i, nn], 0, None)[:, None] ** alpha * x[nn]).sum(0)
        out[i] = v / np.linalg.norm(v)
    return out


def ref_dba(x: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """Each vector replaced by its k nearest database vectors (itself included), weighted."""
    s = x @ x.T
    out = np.empty_like(x)
    for i in range(len(x)):
        nn = np.argsort(-s[i], kind="stable")[:k]
        v = (np.clip(s[i, nn], 0, None)[:, None] ** alpha * x[nn]).sum(0)
        out[i] = v / np.linalg.norm(v)
    return out


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (2, 3.0), (5, 3.0), (10, 0.0), (7, 0.5)])
@pytest.mark.parametrize("chunk_size", [None, 13])
def test_qe_matches_reference(k: int, alpha: float, chunk_size: int | None) -> None:
    x, q = clustered(300, 24, seed=1), clustered(9, 24, seed=2)
    got = alpha_query_expansion(q, x, k=k, alpha=alpha, chunk_size=chunk_size)
    want = ref_qe(q.double().numpy(), x.double().numpy(), k, alpha)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (2, 3.0), (5, 3.0), (10, 0.0), (7, 0.5)])
@pytest.mark.parametrize("chunk_size", [None, 13])
def test_dba_matches_reference(k: int, alpha: float, chunk_size: int | None) -> None:
    x = clustered(300, 24, seed=3)
    got = alpha_database_augmentation(x, k=k, alpha=alpha, chunk_size=chunk_size)
    want = ref_dba(x.double().numpy(), k, alpha)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


def test_negative_similarities_are_clamped() -> None:
    x = unit(50, 4, seed=4)  # low dimension: many negative similarities among the top 40
    got = alpha_database_augmentation(x, k=40, alpha=0.5)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), ref_dba(x.double().numpy(), 40, 0.5), atol=2e-5)


def test_duplicates_follow_the_tie_rule() -> None:
    base = clustered(40, 16, seed=5)
    x = torch.cat([base, base[:10], base[5:15]])  # exact duplicates: equal scores
    for k in (2, 3, 4):
        got = alpha_database_augmentation(x, k=k, alpha=3.0, chunk_size=7)
        np.testing.assert_allclose(got.numpy(), ref_dba(x.double().numpy(), k, 3.0), atol=2e-5)


def test_identity_and_unit_norm() -> None:
    x, q = unit(200, 32, seed=6), unit(11, 32, seed=7)
    torch.testing.assert_close(alpha_query_expansion(q, x, k=1, alpha=0.0), q)
    torch.testing.assert_close(alpha_database_augmentation(x, k=1, alpha=0.0), x)
    for k, alpha in [(3, 3.0), (20, 1.0), (500, 3.0)]:  # k above the database size is clamped
        assert torch.allclose(alpha_query_expansion(q, x, k, alpha).norm(dim=1), torch.ones(11), atol=1e-5)
        assert torch.allclose(alpha_database_augmentation(x, k, alpha).norm(dim=1), torch.ones(200), atol=1e-5)


def test_float16_database_and_bad_arguments() -> None:
    x, q = clustered(100, 16, seed=8), clustered(5, 16, seed=9)
    got = alpha_query_expansion(q, x.half(), k=4)
    want = ref_qe(q.double().numpy(), x.half().double().numpy(), 4, 3.0)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)
    with pytest.raises(ConfigError, match="k must be"):
        alpha_database_augmentation(x, k=0)
    with pytest.raises(ConfigError, match="alpha"):
        alpha_query_expansion(q, x, alpha=-1.0)
    with pytest.raises(DataError, match="dimension"):
        alpha_query_expansion(q[:, :8], x, k=3)


# -------------------------------------------------------------------------------- whitening


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(0)
    return F.normalize(torch.randn(n, d, generator=g) @ mix + 0.3, dim=1)


def covariance(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    c = y - y.mean(0)
    return c.T @ c / y.shape[0]


@pytest.mark.parametrize("dim", [None, 10])
def test_pca_whitening_gives_identity_covariance(dim: int | None) -> None:
    x = correlated(3000, 24, seed=10)
    w = fit_pca_whitening(x, dim=dim, eps=0.0, fitted_on="train")
    y = w.apply(x, normalize=False)
    n_out = dim or 24
    assert y.shape == (3000, n_out) and w.output_dim == n_out and w.input_dim == 24
    torch.testing.assert_close(covariance(y), torch.eye(n_out, dtype=torch.float64), atol=2e-4, rtol=0)
    torch.testing.assert_close(y.double().mean(0), torch.zeros(n_out, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.allclose(w.apply(x).norm(dim=1), torch.ones(3000), atol=1e-5)
    assert w.info["num_descriptors"] == 3000 and w.info["fitted_on"] == "train"
    assert "24 -> " in repr(w) and "3000 descriptors" in repr(w)


def test_pca_whitening_shrinkage_and_limits() -> None:
    x = correlated(500, 16, seed=11)
    iso = fit_pca_whitening(x, shrinkage=1.0, eps=0.0)  # full shrinkage: a rotation times a constant
    norms = iso.projection.norm(dim=1)
    torch.testing.assert_close(norms, norms[0].expand(16))
    with pytest.raises(ConfigError, match="dim=20 exceeds"):
        fit_pca_whitening(x, dim=20)
    with pytest.raises(ConfigError, match="dim=9 exceeds"):
        fit_pca_whitening(x[:9], dim=9)  # 9 descriptors span at most 8 dimensions
    with pytest.raises(ConfigError, match="shrinkage"):
        fit_pca_whitening(x, shrinkage=2.0)
    with pytest.raises(DataError, match="at least 2"):
        fit_pca_whitening(x[:1])
    with pytest.raises(DataError, match="fitted on 16-d"):
        iso.apply(x[:, :8])


def test_learned_whitening_whitens_pair_differences() -> None:
    g = torch.Generator().manual_seed(12)
    d, n_cls, per = 12, 40, 6
    centres = torch.randn(n_cls, d, generator=g)
    noise_mix = torch.randn(d, d, generator=g) * 0.2
    labels = torch.arange(n_cls).repeat_interleave(per)
    x = F.normalize(centres[labels] + torch.randn(n_cls * per, d, generator=g) @ noise_mix, dim=1)
    qi = torch.arange(0, len(x), per).repeat_interleave(per - 1)
    pi = torch.tensor([c * per + j for c in range(n_cls) for j in range(1, per)])
    w = fit_learned_whitening(x, qi, pi, eps=0.0, fitted_on="sfm120k pairs")
    diff = (x[qi] - x[pi]).double()
    s = diff.T @ diff / len(qi)
    p = w.projection.double()
    torch.testing.assert_close(p @ s @ p.T, torch.eye(d, dtype=torch.float64), atol=1e-4, rtol=0)
    assert w.kind == "lw" and w.info["num_pairs"] == len(qi)
    w8 = fit_learned_whitening(x, qi, pi, dim=8)
    assert w8.apply(x).shape == (len(x), 8)
    assert torch.allclose(w8.apply(x).norm(dim=1), torch.ones(len(x)), atol=1e-5)
    with pytest.raises(DataError, match="as many"):
        fit_learned_whitening(x, qi, pi[:-1])


def test_whitening_save_load_round_trip(tmp_path) -> None:
    x = correlated(400, 16, seed=13)
    w = fit_pca_whitening(x, dim=12, shrinkage=0.1, fitted_on="train-set")
    path = save_whitening(w, tmp_path / "w.safetensors")
    back = load_whitening(path)
    assert torch.equal(back.mean, w.mean) and torch.equal(back.projection, w.projection)
    assert back.kind == w.kind and back.metadata() == w.metadata()
    assert back.metadata()["output_dim"] == 12 and back.metadata()["num_descriptors"] == 400
    assert torch.equal(back.apply(x), w.apply(x))
    # deterministic bytes (one metadata key), and the checkpoint-extras form round-trips too
    save_whitening(w, tmp_path / "w2.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == (tmp_path / "w2.safetensors").read_bytes()
    tensors, meta = w.to_state()
    assert set(tensors) == {"mean", "projection"} and meta["type"] == "pca"
    again = Whitening.from_state(tensors, meta)
    assert torch.equal(again.projection, w.projection) and again.info == w.info


def test_whitening_load_errors(tmp_path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="not found"):
        load_whitening(tmp_path / "missing.safetensors")
    save_file({"mean": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="without dtop whitening metadata"):
        load_whitening(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_whitening(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="needs 'mean' and 'projection'"):
        Whitening.from_state({"mean": torch.zeros(3)}, {})
    # the metadata header is read by the one versioned-header reader
    tensors, meta = fit_pca_whitening(correlated(50, 4)).to_state()
    for name, header, message in [
        ("outdated", json.dumps({**meta, "format_version": 2}), "whitening format version 2; this dtop reads 1"),
        ("foreign", json.dumps({**meta, "format": "other"}), "is not a dtop whitening"),
        ("corrupt", "{not json", "is not readable JSON"),
    ]:
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"dtop_whitening": header})
        with pytest.raises(CheckpointError, match=message):
            load_whitening(tmp_path / f"{name}.safetensors")


# --------------------------------------------------------------------------------- pipeline


def test_pipeline_runs_in_fixed_order_and_matches_functions() -> None:
    db, q = clustered(250, 20, seed=14), clustered(7, 20, seed=15)
    pp = PostProcessing.from_config(["qe:k=4,alpha=2", {"name": "dba", "k": 3}, "whiten:fit=database"],
                                    chunk_size=31)
    assert [s.name for s in pp] == ["whiten", "dba", "qe"]
    assert "not fitted" in repr(pp) and not pp.transductive
    q2, db2 = pp.process(q, db)
    assert pp.transductive

    w = fit_pca_whitening(db)
    db_ref = alpha_database_augmentation(w.apply(db), k=3, alpha=3.0)
    q_ref = alpha_query_expansion(w.apply(q), db_ref, k=4, alpha=2.0)
    torch.testing.assert_close(db2, db_ref)
    torch.testing.assert_close(q2, q_ref)
    described = pp.describe()
    assert [d["name"] for d in described] == ["whiten", "dba", "qe"]
    assert described[0]["whitening"]["fitted_on"] == "database"
    assert described[0]["fit"] == "database" and described[0]["transductive"] is True
    assert described[2] == {"name": "qe", "k": 4, "alpha": 2.0}
    assert "QueryExpansion(k=4, alpha=2.0)" in repr(pp)


def test_pipeline_prefitted_whitening(tmp_path) -> None:
    train, db, q = correlated(600, 16, seed=16), correlated(200, 16, seed=17), correlated(5, 16, seed=18)
    pp = PostProcessing.from_config(["whiten:dim=8", "qe"]).fit(train, fitted_on="train")
    q2, db2 = pp.process(q, db)  # not refitted on the database
    w = pp["whiten"].whitening
    assert w.info["fitted_on"] == "train" and w.info["num_descriptors"] == 600
    assert db2.shape == (200, 8)
    torch.testing.assert_close(q2, alpha_query_expansion(w.apply(q), w.apply(db), k=10, alpha=3.0))
    # the same whitening from a file
    save_whitening(w, tmp_path / "w.safetensors")
    pp2 = PostProcessing([Whiten(path=str(tmp_path / "w.safetensors")), QueryExpansion()])
    q3, db3 = pp2.process(q, db)
    assert torch.equal(q3, q2) and torch.equal(db3, db2)


def test_pipeline_empty_and_config_errors() -> None:
    db, q = unit(20, 8), unit(3, 8, seed=1)
    empty = PostProcessing.from_config(None)
    out_q, out_db = empty.process(q, db)
    assert out_q is q and out_db is db and len(empty) == 0
    with pytest.raises(ConfigError, match="more than once"):
        PostProcessing.from_config(["qe", "qe:k=3"])
    with pytest.raises(ConfigError, match="did you mean 'dba'"):
        PostProcessing.from_config(["dbaa"])
    with pytest.raises(ConfigError, match="no parameter 'kk'"):
        PostProcessing.from_config([{"name": "qe", "kk": 3}])
    with pytest.raises(ConfigError, match="key=value"):
        PostProcessing.from_config(["qe:k"])
    with pytest.raises(ConfigError, match="needs a 'name'"):
        PostProcessing.from_config([{"k": 3}])
    with pytest.raises(ConfigError, match="no whitening"):
        Whiten().apply_queries(q, db)
    assert repr(DatabaseAugmentation(k=5, alpha=1)) == "DatabaseAugmentation(k=5, alpha=1.0)"


# ------------------------------------------------------------------- no silent transductive whitening


def test_bare_whiten_without_a_whitening_is_an_error_with_a_hint() -> None:
    db, q = correlated(100, 8, seed=20), correlated(4, 8, seed=21)
    pp = PostProcessing.from_config(["whiten", "qe"])
    for run in (pp.check, lambda: pp.process(q, db)):
        with pytest.raises(ConfigError) as err:
            run()
        message = str(err.value)
        assert "whiten:path=FILE" in message and "dtop whiten" in message and "whiten:fit=database" in message
        assert "transductive" in message
    assert not pp["whiten"].fitted  # nothing was fitted on the database


def test_fit_database_is_explicit_and_marked() -> None:
    db, q = correlated(100, 8, seed=22), correlated(4, 8, seed=23)
    pp = PostProcessing.from_config(["whiten:fit=database"]).check()  # allowed: it says so
    q2, db2 = pp.process(q, db)
    ref = fit_pca_whitening(db)
    torch.testing.assert_close(db2, ref.apply(db))
    torch.testing.assert_close(q2, ref.apply(q))
    assert pp.transductive and pp.describe()[0]["transductive"] is True
    # fitted on other descriptors beforehand: the database is not used, nothing is transductive
    train = correlated(300, 8, seed=24)
    pp = PostProcessing.from_config(["whiten:fit=database"]).fit(train, fitted_on="train")
    pp.process(q, db)
    assert not pp.transductive and "transductive" not in pp.describe()[0]
    torch.testing.assert_close(pp["whiten"].whitening.mean, fit_pca_whitening(train).mean)
    # a loaded or given whitening is never transductive
    assert not PostProcessing([Whiten(whitening=ref)]).transductive


def test_whiten_fit_choices_and_conflicts(tmp_path) -> None:
    w = fit_pca_whitening(correlated(100, 8, seed=25))
    path = save_whitening(w, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="not a choice"):
        PostProcessing.from_config(["whiten:fit=queries"])
    with pytest.raises(ConfigError, match="not both"):
        PostProcessing.from_config([f"whiten:path={path},fit=database"])
    with pytest.raises(ConfigError, match="not both"):
        Whiten(fit="database", whitening=w)


def test_loaded_whitening_truncated_to_dim(tmp_path) -> None:
    train, x = correlated(400, 12, seed=26), correlated(9, 12, seed=27)
    w = fit_learned_whitening(train, torch.arange(0, 398, 2), torch.arange(1, 399, 2), fitted_on="train")
    path = save_whitening(w, tmp_path / "lw.safetensors")
    step = PostProcessing.from_config([f"whiten:path={path},dim=5"])["whiten"]
    assert step.whitening.output_dim == 5 and step.whitening.kind == "lw"
    # the first 5 axes of the full projection, then normalised
    full = (x - w.mean) @ w.projection.T
    torch.testing.assert_close(step.apply_queries(x, x), F.normalize(full[:, :5], dim=1))
    assert w.truncated(12) is w
    with pytest.raises(ConfigError, match="1..12"):
        w.truncated(13)
