"""The SfM-120k tuple protocol in the trainer: pairs, tuple batches, mining each epoch, exact resume, DDP."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_CONFIG, make_classes, train_state
from dtop.data.training import TrainingSet, collate_tuples
from dtop.engine.mining import TupleBatchSampler, TupleSampler, common_size, pairs_from_labels
from dtop.engine.train import Trainer, build_tuple_sampler, train
from dtop.engine.train_config import load_train_config
from dtop.errors import ConfigError, DataError

CONTRASTIVE = ["loss.name=contrastive", "loss.num_queries=12", "loss.pool_size=36", "loss.num_negatives=2",
               "optim.batch_size=2", "data.augment=false", "data.train_size=64", "data.num_workers=0",
               "run.progress=false", "run.log_every=1", "loss.mining_batch_size=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_classes(tmp_path_factory.mktemp("tuples") / "classes")


def config(out: Path, data: Path, *extra: str):
    return load_train_config(TINY_TRAIN_CONFIG, [f"data.root={data}", f"run.out={out}", *CONTRASTIVE, *extra])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- pieces


def test_pairs_from_labels_pair_each_image_with_another_of_its_class():
    labels = [3, 1, 3, 3, 2, 1, 9]
    q, p = pairs_from_labels(labels)
    assert sorted(q.tolist()) == [0, 1, 2, 3, 5]  # classes 2 and 9 have one image: no pair
    assert sorted(p.tolist()) == sorted(q.tolist())  # every such image is a positive once
    for a, b in zip(q, p, strict=True):
        assert a != b and labels[a] == labels[b]
    with pytest.raises(DataError, match="two images"):
        pairs_from_labels([0, 1, 2])


def _sampler(n_images=30, tuples_per_batch=2, num_queries=7, seed=0):
    labels = np.arange(n_images) // 3
    q, p = pairs_from_labels(labels)
    tuples = TupleSampler(q, p, labels, num_queries=num_queries, pool_size=n_images, num_negatives=2, seed=seed)
    rng = np.random.default_rng(1)
    sizes = np.stack([rng.integers(40, 120, n_images), rng.integers(40, 120, n_images)], axis=1)  # width, height
    describe = lambda idx: torch.nn.functional.normalize(torch.randn(len(idx), 8, generator=torch.Generator().manual_seed(len(idx))), dim=1)  # noqa: E501, E731
    return TupleBatchSampler(tuples, tuples_per_batch, sizes, train_size=64), sizes, describe


def test_tuple_batches_hold_whole_tuples_at_one_common_size():
    sampler, sizes, describe = _sampler()
    sampler.tuples.mine(describe)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3  # 7 tuples, 2 per batch: the partial last batch is dropped
    expected = sampler.tuples.tuples()
    for b, batch in enumerate(batches):
        indices = [i for i, _ in batch]
        assert indices == [i for t in expected[2 * b: 2 * b + 2] for i in t]
        assert len({size for _, size in batch}) == 1
        assert batch[0][1] == common_size([(int(sizes[i, 1]), int(sizes[i, 0])) for i in indices], 64)
        assert max(batch[0][1]) == 64


def test_tuple_batch_sampler_resumes_mid_epoch_and_at_its_end():
    a, _, describe = _sampler()
    a.tuples.mine(describe)
    full = list(a)
    b, _, _ = _sampler()
    b.load_state_dict(a.state_dict(batches_done=1))  # carries the mined negatives: no describe needed
    assert list(b) == full[1:]
    b.load_state_dict(a.state_dict(batches_done=len(a)))
    assert list(b) == []  # resumed at the end of the epoch: nothing is repeated
    b.set_epoch(1)
    assert b.tuples.negatives is None  # a new epoch mines again
    c, _, _ = _sampler(tuples_per_batch=3)
    with pytest.raises(ConfigError, match="tuples_per_batch"):
        c.load_state_dict(a.state_dict())


def test_collate_tuples_drops_a_tuple_with_a_bad_image_whole():
    img = lambda v: (torch.full((3, 4, 4), float(v)), 0)  # noqa: E731
    batch = [img(1), img(2), img(3), img(4), None, img(6)]
    images, labels, skipped = collate_tuples(batch, tuple_size=3)
    assert labels is None and skipped == 3
    assert images[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert collate_tuples([None, img(1)], tuple_size=2) == (None, None, 2)
    with pytest.raises(DataError, match="tuples of 3"):
        collate_tuples(batch[:4], tuple_size=3)


def test_sfm120k_pairs_are_the_ones_of_the_file(tmp_path, data):
    cfg = config(tmp_path / "run", data, "loss.num_queries=3", "optim.batch_size=1")
    paths = [str(p) for p in sorted(data.rglob("*.jpg"))][:12]
    labels = np.arange(12) // 4
    pairs = {(0, 2), (5, 6), (9, 11)}
    ts = TrainingSet(paths, labels, 3, ["a", "b", "c"], sizes=np.full((12, 2), 64),
                     extras={"qidxs": [q for q, _ in pairs], "pidxs": [p for _, p in pairs]})
    sampler = build_tuple_sampler(cfg, ts, rank=0, world=1)
    sampler.tuples.mine(lambda idx: torch.nn.functional.normalize(torch.randn(len(idx), 4), dim=1))
    got = {tuple(batch[i][0] for i in (0, 1)) for batch in sampler}
    assert got == pairs
    with pytest.raises(ConfigError, match="do not fill one batch"):
        build_tuple_sampler(config(tmp_path / "x", data, "loss.num_queries=3", "optim.batch_size=4"), ts, 0, 1)


# ------------------------------------------------------------------------------------------ trainer


def _tuple_loss(trainer: Trainer, tuples: list[tuple[int, ...]]) -> float:
    """The contrastive loss of ``tuples`` with the trainer's current model (descriptors at train size)."""
    images = sorted({i for t in tuples for i in t})
    descriptors = dict(zip(images, trainer.describe_images(images), strict=True))
    stacked = torch.stack([descriptors[i] for t in tuples for i in t])
    with torch.no_grad():
        return float(trainer.loss.tuple_loss(stacked, len(tuples[0])))


def test_contrastive_training_lowers_the_loss_of_the_mined_tuples(tmp_path, data):
    trainer = Trainer(config(tmp_path / "run", data, "run.max_steps=18", "optim.epochs=100"))
    trainer.mine()
    tuples = trainer.sampler.tuples.tuples()
    before = _tuple_loss(trainer, tuples)
    summary = trainer.train()
    assert summary["steps"] == 18
    trainer.sampler.set_epoch(0)
    trainer.sampler.tuples.negatives = None
    trainer.sampler.tuples.mine(trainer.describe_images)  # the same tuples, re-mined, must be easier now
    assert _tuple_loss(trainer, tuples) < 0.8 * before
    mined = [r for r in records(tmp_path / "run") if r.get("event") == "mining"]
    assert [r["epoch"] for r in mined] == [0, 1, 2]  # 6 steps per epoch: mined again at each epoch start
    assert all(r["mean_negative_distance"] > 0 for r in mined)


def test_contrastive_resume_is_exact_across_an_epoch_boundary(tmp_path, data):
    train(config(tmp_path / "a", data, "run.max_steps=8", "optim.epochs=100"))
    train(config(tmp_path / "b", data, "run.max_steps=4", "optim.epochs=100"))
    Trainer(config(tmp_path / "b", data, "run.max_steps=8", "optim.epochs=100"), resume=True).train()
    a, b = train_state(tmp_path / "a"), train_state(tmp_path / "b")
    assert a["step"] == b["step"] == 8 and a["epoch"] == 1
    assert torch.equal(a["sampler"]["tuples"]["negatives"], b["sampler"]["tuples"]["negatives"])
    for key, value in a["module"].items():
        assert torch.equal(value, b["module"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # the resumed run mined epoch 1 itself; epoch 0's negatives came from its state, not a re-mining
    assert [r["epoch"] for r in records(tmp_path / "b") if r.get("event") == "mining"] == [0, 1]


def test_unreadable_image_is_skipped_in_mining_and_training_never_fatal(tmp_path, data, caplog):
    import shutil

    folder = tmp_path / "classes"
    shutil.copytree(data, folder)
    (folder / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = config(tmp_path / "run", folder, "optim.epochs=1", "loss.num_queries=null", "loss.pool_size=100",
                 "optim.batch_size=6")
    with caplog.at_level("WARNING"):
        summary = train(cfg)  # every pair and the whole pool each epoch: the broken image is in tuples
    assert "broken.jpg" in caplog.text  # mining logs it
    assert summary["epochs"] == 1 and summary["skipped_images"] >= 1


DDP_SCRIPT = """
import sys, torch
from dtop.engine.train import Trainer
from dtop.engine.train_config import load_train_config
trainer = Trainer(load_train_config(sys.argv[1], sys.argv[2:]))
trainer.train()
torch.save({"module": trainer.module.state_dict(), "negatives": trainer.sampler.tuples.negatives},
           f"{trainer.out}/rank{trainer.rank}.pt")
"""


@pytest.mark.slow
def test_ddp_contrastive_ranks_mine_the_same_negatives_and_stay_in_sync(tmp_path, data):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    common = [f"data.root={data}", *CONTRASTIVE, "optim.epochs=1", "run.max_steps=2", "run.device=cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                    str(script), TINY_TRAIN_CONFIG, *common, f"run.out={tmp_path / 'ddp'}"],
                   check=True, env=env, timeout=300)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["negatives"], r1["negatives"])
    for key, value in r0["module"].items():
        assert torch.equal(value, r1["module"][key]), key
    # the sharded, all-gathered mining finds what one process mining everything finds
    one = Trainer(load_train_config(TINY_TRAIN_CONFIG, [*common, f"run.out={tmp_path / 'one'}"]))
    one.mine()
    assert torch.equal(one.sampler.tuples.negatives, r0["negatives"])


CONFIGS = Path(__file__).parents[1] / "configs"
TINY_MODEL = ["model.backbone=hybrid", "model.stem_layers=[1,1,1]", "model.pretrained=none",
              "model.backbone_args={embed_dim: 64, depth: 4, num_heads: 2, img_size: 128}", "model.layers=[-2,-1]",
              "model.dim=64", "model.global_dim=64", "model.local_dim=64", "model.local_channels=64",
              "model.locality_blocks=2"]


def test_every_shipped_training_config_loads():
    names = [p.name for p in sorted((CONFIGS / "train").glob("*.yaml")) if not p.name.startswith("_")]
    assert "sfm120k_contrastive.yaml" in names and len(names) >= 8
    for name in names:
        cfg = load_train_config(str(CONFIGS / "train" / name))
        assert cfg.loss.resolved_margin() > 0, name
    cfg = load_train_config(str(CONFIGS / "train" / "sfm120k_contrastive.yaml"))
    assert (cfg.loss.name, cfg.loss.resolved_margin(), cfg.data.format) == ("contrastive", 0.7, "sfm120k")
    assert load_train_config(str(CONFIGS / "train" / "sfm120k.yaml")).loss.resolved_margin() == 0.3


def test_dtop_train_runs_the_shipped_contrastive_config_on_an_sfm120k_folder(tmp_path):
    from dtop.cli.main import main
    from dtop.data.training import sfm_relative_path
    from dtop.models import load_model

    root = tmp_path / "retrieval-SfM-120k"
    rng = np.random.default_rng(0)
    cids, clusters = [], []
    for c in range(5):
        colour = rng.integers(0, 255, 3)
        for k in range(4):
            cid = f"{c:02d}{k:02d}" + "".join(rng.choice(list("0123456789abcdef"), 10))
            path = root / "ims" / sfm_relative_path(cid)
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colour + rng.integers(-30, 30, (48 + 8 * k, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, format="JPEG")
            cids.append(cid)
            clusters.append(100 + c)
    db = {"train": {"cids": cids, "cluster": clusters, "qidxs": [0, 4, 8, 12, 16, 1], "pidxs": [1, 5, 9, 13, 17, 2]}}
    (root / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db, protocol=2))
    out = tmp_path / "run"
    code = main(["train", "--config", str(CONFIGS / "train" / "sfm120k_contrastive.yaml"), f"data.root={root}",
                 f"run.out={out}", *TINY_MODEL, "data.train_size=64", "data.num_workers=0", "optim.batch_size=2",
                 "loss.num_queries=6", "loss.pool_size=20", "loss.num_negatives=2", "optim.epochs=2",
                 "run.progress=false", "optim.amp=none", "run.device=cpu", "run.log_every=1"])
    assert code == 0
    steps = [r for r in records(out) if "loss" in r]
    assert steps[-1]["step"] == 6 and all(np.isfinite(r["loss"]) for r in steps)  # 3 batches × 2 epochs
    assert [r["epoch"] for r in records(out) if r.get("event") == "mining"] == [0, 1]
    assert load_model(out / "last.safetensors").descriptor_dim == 64
