"""Training DToP (and its baselines): ArcFace on landmark/cluster labels, or the SfM-120k tuples (SPEC §4).

One process or many under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs); every rank takes a
disjoint part of each epoch from the group-size batch sampler. AdamW with a lower learning rate
for the backbone, linear warm-up + cosine decay (stepped per optimiser step), gradient clipping,
AMP (bf16, or fp16 with a gradient scaler), optional gradient checkpointing and accumulation.

Run folder::

    config.yaml          the resolved configuration
    metrics.jsonl        one JSON line per logged step / validation
    last.safetensors     the latest model (dtop checkpoint: loads with dtop.load_model)
    best.safetensors     the model with the best validation mAP (when validating)
    state.pt             everything needed to resume exactly (weights_only-loadable)

**Contrastive tuples** (``loss.name: contrastive``): at the start of each epoch the current model
describes the epoch's queries and negative pool (rank ``r`` of ``w`` describes every ``w``-th
image, all-gathered), hard negatives are mined (:class:`dtop.engine.mining.TupleSampler`), and a
batch is ``optim.batch_size`` tuples at one common size (:class:`~dtop.engine.mining.TupleBatchSampler`).
A tuple with an unreadable image is dropped whole (and its images counted as skipped).

**Exact resume**: ``state.pt`` holds model, loss, optimiser, scheduler and scaler states, the
sampler position and the RNG states; data augmentation is seeded per (seed, epoch, image), not
by worker processes, so an interrupted run continues as if uninterrupted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dtop.engine.train_config import TrainConfig
from dtop.errors import CheckpointError, ConfigError
from dtop.models import build_model, save_checkpoint
from dtop.models.base import RetrievalModel
from dtop.utils.io import atomic_path, write_text

STATE_FILE = "state.pt"


# ---------------------------------------------------------------------------------------- pieces


class TrainModule(nn.Module):
    """Model + loss in one module, so DDP synchronises the loss's class weights too.

    With ``tuple_size`` the batch is tuples ``(q, p, n1 … nk)`` laid out one after the other and the
    loss is the contrastive tuple loss (labels unused).
    """

    def __init__(self, model: RetrievalModel, loss: nn.Module, tuple_size: int | None = None):
        super().__init__()
        self.model = model
        self.loss = loss
        self.tuple_size = tuple_size

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        if self.tuple_size is not None:
            return self.loss.tuple_loss(self.model(images), self.tuple_size)
        return self.loss(self.model(images), labels)


class SeededItems(Dataset):
    """Seeds the RNGs for each item from (seed, epoch, index): augmentation independent of workers."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple | list) else item
        item_seed = (self.seed * 1_000_003 + self.epoch * 7_919 + int(index) * 104_729) % (2**31)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed)
            return self.dataset[item]


def param_groups(model: RetrievalModel, loss: nn.Module, lr: float, backbone_mult: float, weight_decay: float):
    """AdamW groups: backbone (stem, encoder) at ``lr × backbone_mult``; locality, head and loss at ``lr``.

    Biases, norms, GeM ``p`` and other 1-D parameters get no weight decay.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = model.part_of(name)
        slow = part in ("stem", "encoder")
        groups.setdefault((("backbone" if slow else "head"), param.ndim > 1), []).append(param)
    for param in loss.parameters():
        groups.setdefault(("head", True), []).append(param)
    out = []
    for (kind, decay), params in sorted(groups.items()):
        out.append({"params": params, "lr": lr * (backbone_mult if kind == "backbone" else 1.0),
                    "weight_decay": weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '-no-decay'}"})
    return out


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU, CUDA), numpy and python, as tensors (weights_only-loadable)."""
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.tensor(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2]),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


# ------------------------------------------------------------------------------------ data + loss


def build_training_set(config: TrainConfig):
    """The :class:`~dtop.data.training.TrainingSet` of ``config.data``."""
    from dtop.data.training import load_training_set

    d = config.data
    return load_training_set(d.format, d.root, csv_path=d.csv, path_column=d.path_column,
                             label_column=d.label_column, exclude=d.exclude,
                             min_images_per_class=d.min_images_per_class)


def build_loss(config: TrainConfig, embedding_dim: int, num_classes: int) -> nn.Module:
    """The loss module of ``config.loss``."""
    from dtop.engine.losses import build_loss as _build

    c = config.loss
    if c.name == "contrastive":
        return _build("contrastive", margin=c.resolved_margin())
    subcenters = c.subcenters if c.name == "subcenter-arcface" else 1
    return _build("arcface" if subcenters == 1 else "subcenter-arcface", embedding_dim=embedding_dim,
                  num_classes=num_classes, margin=c.resolved_margin(), scale=c.scale, subcenters=subcenters)


def build_sampler(config: TrainConfig, training_set, rank: int, world: int):
    """The batch sampler: tuples for the contrastive loss, else the one of ``config.data.sampling``."""
    from dtop.data.sampler import FixedSizeBatchSampler, GroupSizeBatchSampler

    if config.loss.name == "contrastive":
        return build_tuple_sampler(config, training_set, rank, world)
    cls = GroupSizeBatchSampler if config.data.sampling == "group-size" else FixedSizeBatchSampler
    return cls(training_set.aspect_ratios(), batch_size=config.optim.batch_size, train_size=config.data.train_size,
               seed=config.run.seed, rank=rank, world_size=world, drop_last=True)


def build_tuple_sampler(config: TrainConfig, training_set, rank: int, world: int):
    """The :class:`~dtop.engine.mining.TupleBatchSampler` of the contrastive protocol."""
    from dtop.engine.mining import TupleBatchSampler, TupleSampler, pairs_from_labels

    extras = training_set.extras
    if "qidxs" in extras and "pidxs" in extras:
        qidxs, pidxs = extras["qidxs"], extras["pidxs"]
    else:
        qidxs, pidxs = pairs_from_labels(training_set.labels)
    c = config.loss
    tuples = TupleSampler(qidxs, pidxs, training_set.labels, num_queries=c.num_queries, pool_size=c.pool_size,
                          num_negatives=c.num_negatives, seed=config.run.seed, rank=rank, world_size=world)
    sampler = TupleBatchSampler(tuples, config.optim.batch_size, training_set.image_sizes(),
                                config.data.train_size)
    if len(sampler) == 0:
        raise ConfigError(
            f"{tuples.num_queries} tuples per epoch over {world} rank(s) do not fill one batch of "
            f"optim.batch_size={config.optim.batch_size} tuples; lower optim.batch_size or raise loss.num_queries"
        )
    return sampler


# ---------------------------------------------------------------------------------------- trainer


class Trainer:
    """Runs one training job described by a :class:`TrainConfig`; see the module doc."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.out = Path(config.run.out)
        self.rank, self.world, self.device = self._setup_distributed(config.run.device)
        _seed_everything(config.run.seed)
        self.training_set = build_training_set(config)
        self.model = build_model(config.model).to(self.device)
        if config.optim.grad_checkpointing and hasattr(self.model.backbone, "set_grad_checkpointing"):
            self.model.backbone.set_grad_checkpointing(True)
        self.loss = build_loss(config, self.model.descriptor_dim, self.training_set.num_classes).to(self.device)
        self.contrastive = config.loss.name == "contrastive"
        self.sampler = build_sampler(config, self.training_set, self.rank, self.world)
        self.module = TrainModule(self.model, self.loss, self.sampler.tuple_size if self.contrastive else None)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.ddp = self.module
        o = config.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.loss, o.lr, o.backbone_lr_mult,
                                                        o.weight_decay), lr=o.lr)
        self.steps_per_epoch = max(1, len(self.sampler) // o.accum_steps)
        # The schedule spans the configured epochs; max_steps / max_minutes only stop early, so a run
        # stopped and resumed follows the same schedule as an uninterrupted one.
        schedule_steps = self.steps_per_epoch * o.epochs
        self.total_steps = schedule_steps
        if config.run.max_steps is not None:
            self.total_steps = min(self.total_steps, config.run.max_steps)
        warmup = min(o.warmup_steps, schedule_steps // 2 or 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup, schedule_steps, o.min_lr_ratio))
        # "none" | "bf16" | "fp16" (auto resolved for the device), as extraction's amp option takes it
        self.amp = o.amp if o.amp != "auto" else ("bf16" if self.device.type == "cuda" else "none")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        from dtop.data.training import TrainDataset

        self.dataset = SeededItems(TrainDataset(self.training_set, augment=config.data.augment,
                                                mean=self.model.mean, std=self.model.std), config.run.seed)
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.best, self.skipped = None, 0
        self.sampler.set_epoch(0)
        if resume:
            self._load_state()
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", yaml.safe_dump(_plain(asdict(config)), sort_keys=False))
        self.writer = self._tensorboard() if config.run.tensorboard and self.rank == 0 else None

    # ---------------------------------------------------------------------------------- set-up

    @staticmethod
    def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
        rank = torch.distributed.get_rank() if world > 1 else 0
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        return rank, world, dev

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("run.tensorboard needs the tensorboard package: pip install tensorboard") from err
        return SummaryWriter(str(self.out / "tensorboard"))

    # ---------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (tensors and plain values only)."""
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            # the DataLoader prefetches: record the batches consumed, not those the sampler yielded
            "sampler": self.sampler.state_dict(batches_done=self.batches_done),
            "step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
            "best": self.best, "skipped": self.skipped,
            "rng": rng_state(),
            "config": json.dumps(_plain(asdict(self.config))),
        }

    def save(self) -> None:
        """Write ``last.safetensors`` and ``state.pt`` atomically (rank 0)."""
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, self.out / "last.safetensors",
                        metadata={"step": self.step, "epoch": self.epoch, "train_run": str(self.out.resolve())})
        with atomic_path(self.out / STATE_FILE) as tmp:
            torch.save(self.state_dict(), tmp)

    def _load_state(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} not found (start without --resume, or check run.out)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot resume: {path} is not a readable training state ({err})") from err
        saved = json.loads(state["config"])
        diffs = [f"{s}.{k}" for s in ("model", "data", "loss") for k in saved[s]
                 if saved[s][k] != _plain(asdict(self.config))[s][k]]
        if diffs:
            raise CheckpointError(f"cannot resume {path}: the run was started with other settings for "
                                  f"{', '.join(diffs[:5])}; resume with the same config")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.best, self.skipped = state["best"], state["skipped"]
        set_rng_state(state["rng"])

    # ---------------------------------------------------------------------------------- loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "epoch"):
                    self.writer.add_scalar(key, value, record.get("step", self.step))

    def _loader(self) -> DataLoader:
        from dtop.data.training import collate_skip_bad, collate_tuples

        self.dataset.epoch = self.epoch
        workers = self.config.data.num_workers
        collate = functools.partial(collate_tuples, tuple_size=self.sampler.tuple_size) if self.contrastive \
            else collate_skip_bad
        return DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=2 if workers else None)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train(self) -> dict[str, Any]:
        """Train until the epochs, ``max_steps`` or ``max_minutes`` run out; returns a summary."""
        c = self.config
        start = time.monotonic()
        deadline = start + 60 * c.run.max_minutes if c.run.max_minutes else None
        self.module.train()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                   disable=not c.run.progress or self.rank != 0)
        stopped = False
        images_seen, t_log = 0, time.monotonic()
        while self.epoch < c.optim.epochs and not stopped:
            micro, loss_sum = 0, 0.0
            if self.contrastive:
                self.mine()
            for images, labels, n_skipped in self._loader():
                self.skipped += int(n_skipped)
                self.batches_done += 1
                if images is None:
                    continue
                images = images.to(self.device, non_blocking=True)
                if labels is not None:
                    labels = labels.to(self.device, non_blocking=True)
                sync = (micro + 1) % c.optim.accum_steps == 0
                ctx = self.ddp.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
                with ctx, self._autocast():
                    loss = self.ddp(images, labels) / c.optim.accum_steps
                self.scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
                images_seen += images.shape[0]
                micro += 1
                if not sync:
                    continue
                if c.optim.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.module.parameters(), c.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                if self.step % c.run.log_every == 0 or self.step == 1:
                    now = time.monotonic()
                    rate = images_seen * self.world / max(now - t_log, 1e-9)
                    self._log({"step": self.step, "epoch": self.epoch, "loss": loss_sum,
                               "lr": self.optimizer.param_groups[-1]["lr"], "images_per_s": rate,
                               "skipped": self.skipped})
                    bar.set_postfix(loss=f"{loss_sum:.3f}", img_s=f"{rate:.1f}")
                    images_seen, t_log = 0, now
                loss_sum = 0.0
                if self.step % c.run.save_every == 0:
                    self.save()
                if (c.run.max_steps is not None and self.step >= c.run.max_steps) or \
                        (deadline is not None and time.monotonic() > deadline):
                    stopped = True
                    break
            if not stopped:
                self.epoch += 1
                self.batches_done = 0
                self.sampler.set_epoch(self.epoch)
                if c.val.dataset and self.epoch % c.val.every_epochs == 0:
                    self.validate()
                self.save()
        bar.close()
        self.save()
        if c.val.dataset and self.best is None:
            self.validate()
            self.save()
        summary = {"steps": self.step, "epochs": self.epoch, "skipped_images": self.skipped,
                   "minutes": (time.monotonic() - start) / 60, "best_val": self.best}
        self._log({"event": "end", **summary})
        if self.world > 1:
            torch.distributed.barrier()
        return summary

    def mine(self) -> None:
        """Mine this epoch's hard negatives with the current model (contrastive; once per epoch).

        A resumed run finds the epoch's negatives in its state and does not mine again.
        """
        tuples = self.sampler.tuples
        if tuples.negatives is not None:
            return
        start = time.monotonic()
        tuples.mine(self.describe_images)
        self._log({"event": "mining", "step": self.step, "epoch": self.epoch,
                   "mean_negative_distance": tuples.mean_negative_distance,
                   "mining_seconds": time.monotonic() - start})

    def describe_images(self, indices: list[int]) -> torch.Tensor:
        """Descriptors (n, d) of training images at ``data.train_size`` with the current model.

        Rank ``r`` of ``w`` describes ``indices[r::w]``; the parts are all-gathered, so every rank
        returns the same matrix. An unreadable image gets a zero row (and a warning); a tuple it
        ends up in is dropped by :func:`~dtop.data.training.collate_tuples` and counted as skipped.
        """
        from dtop.engine.extract import ExtractSettings, extract

        mine = list(indices)[self.rank :: self.world]
        self.model.eval()
        try:
            part = extract(self.model, [self.training_set.paths[i] for i in mine],
                           settings=ExtractSettings(image_size=self.config.data.train_size, scales=[1.0]),
                           batch_size=self.config.loss.mining_batch_size, num_workers=self.config.data.num_workers,
                           device=self.device, amp=self.amp, skip_bad=True)
        finally:
            self.model.train()
        if self.world == 1:
            return part
        rows = -(-len(indices) // self.world)
        padded = torch.zeros(rows, part.shape[1], device=self.device)
        padded[: len(part)] = part.to(self.device)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, padded)
        out = torch.empty(len(indices), part.shape[1])
        for r, g in enumerate(gathered):
            n_r = len(range(r, len(indices), self.world))
            out[r :: self.world] = g[:n_r].cpu()
        return out

    def validate(self) -> float | None:
        """Revisited evaluation (rank 0, in memory); keeps ``best.safetensors``. Returns mean of M/H mAP."""
        value = None
        if self.rank == 0:
            from dtop.data.revisited import RevisitedDataset
            from dtop.engine.extract import ExtractSettings, extract
            from dtop.retrieval.metrics import evaluate_scores

            v = self.config.val
            ds = RevisitedDataset(v.data_root, v.dataset)
            settings = ExtractSettings(image_size=v.image_size, scales=v.scales)
            self.model.eval()
            kw = dict(settings=settings, batch_size=v.batch_size, device=self.device, amp=self.amp)
            q = extract(self.model, ds.query_paths, bbxs=ds.query_bbxs, **kw)
            x = extract(self.model, ds.database_paths, **kw)
            self.model.train()
            results = evaluate_scores(q @ x.T, ds.gnd)
            value = (results["medium"]["map"] + results["hard"]["map"]) / 2
            self._log({"step": self.step, "epoch": self.epoch, "val_map_easy": results["easy"]["map"],
                       "val_map_medium": results["medium"]["map"], "val_map_hard": results["hard"]["map"],
                       "val_map": value})
            if self.best is None or value > self.best:
                self.best = value
                save_checkpoint(self.model, self.out / "best.safetensors",
                                metadata={"step": self.step, "epoch": self.epoch, "val_map": value,
                                          "train_run": str(self.out.resolve())})
        if self.world > 1:
            torch.distributed.barrier()
        return value


def _plain(obj: Any) -> Any:
    """Tuples → lists, so that configs compare equal after a JSON round trip."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train a model as ``config`` says (see :class:`Trainer`); returns a summary."""
    return Trainer(config, resume=resume).train()
