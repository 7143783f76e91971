"""Training DToP and its baselines: ArcFace on class labels, or the SfM-120k contrastive tuples.

:class:`Trainer` runs one job of a :class:`~dtop.engine.train_config.TrainConfig`, in one process
or under ``torchrun``; its run folder, resume and distributed design are in docs/engine.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dtop.engine.cleaning import Cleaning, apply_cleaning, maybe_clean
from dtop.engine.mining import TupleBatchSampler
from dtop.engine.runtime import amp_dtype, autocast_context, init_distributed, resolve_amp
from dtop.engine.seeding import SeededItems, rng_state, seed_everything, set_rng_state
from dtop.engine.settings import ExtractSettings
from dtop.engine.train_config import TrainConfig
from dtop.engine.train_parts import (
    TrainModule,
    build_loss,
    build_sampler,
    build_training_set,
    build_tuple_sampler,
    freeze_cnn,
    param_groups,
    warmup_cosine,
)
from dtop.engine.train_run import (
    METRICS_FILE,
    STATE_FILE,
    check_new_run,
    clear_run,
    diverged_hint,
    metrics_size,
    no_step_reason,
    plain,
    settings_differences,
    truncate_metrics,
)
from dtop.errors import CheckpointError, ConfigError, TrainingError
from dtop.models import build_model, save_checkpoint
from dtop.utils.io import atomic_path, write_text

log = logging.getLogger(__name__)

# The pieces live in train_parts; they stay importable from here, where users found them.
__all__ = [
    "Trainer", "TrainModule", "build_loss", "build_sampler", "build_training_set", "build_tuple_sampler",
    "param_groups", "train", "warmup_cosine",
]

if TYPE_CHECKING:
    from dtop.data.sampler import FixedSizeBatchSampler, GroupSizeBatchSampler

    BatchSampler = GroupSizeBatchSampler | FixedSizeBatchSampler | TupleBatchSampler



# ---------------------------------------------------------------------------------------- pieces


class Trainer:
    """Runs one training job described by a :class:`TrainConfig` (see docs/engine.md)."""

    def __init__(self, config: TrainConfig, resume: bool = False, overwrite: bool = False):
        self.config = config
        self.out = Path(config.run.out)
        if not resume:
            check_new_run(self.out, overwrite)
        runtime = init_distributed(config.run.device)
        self.rank, self.world, self.device = runtime.rank, runtime.world, runtime.device
        if not resume and overwrite and self.rank == 0:
            clear_run(self.out)
        seed_everything(config.run.seed)
        self.training_set = build_training_set(config)
        self._build_model_and_loss()
        self._build_optimisation()
        # "none" | "bf16" | "fp16" (auto resolved for the device), as extraction's amp option takes it
        self.amp = resolve_amp(config.optim.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype(self.amp, self.device) == torch.float16)
        from dtop.data.training import TrainDataset

        self.dataset = SeededItems(TrainDataset(self.training_set, augment=config.data.augment,
                                                mean=self.model.mean, std=self.model.std), config.run.seed)
        self.step, self.epoch, self.batches_done = 0, 0, 0
        self.best: float | None = None
        self.skipped = 0
        self.sampler.set_epoch(0)
        self.cleaning: Cleaning | None = None  # sub-center ArcFace's cleaning, once done (loss.clean_after_epoch)
        if resume:
            self._load_state()
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", yaml.safe_dump(plain(asdict(config)), sort_keys=False))
        self.writer = self._tensorboard() if config.run.tensorboard and self.rank == 0 else None

    # ---------------------------------------------------------------------------------- set-up

    def _build_model_and_loss(self) -> None:
        """Model, loss, batch sampler and the (DDP-wrapped) module that trains them together."""
        config = self.config
        self.model = build_model(config.model).to(self.device)
        if config.run.channels_last:  # NHWC: faster convolutions (docs/training.md)
            self.model.to(memory_format=torch.channels_last)
        frozen = freeze_cnn(self.model, config.optim.freeze_stride)
        if frozen and self.rank == 0:
            log.info("optim.freeze_stride=%d: %d CNN tensors keep their weights (%s ... %s)",
                     config.optim.freeze_stride, len(frozen), frozen[0], frozen[-1])
        set_grad_checkpointing = getattr(self.model.backbone, "set_grad_checkpointing", None)
        if config.optim.grad_checkpointing and callable(set_grad_checkpointing):  # timm backbones have it
            set_grad_checkpointing(True)
        self.loss = build_loss(config, self.model.descriptor_dim, self.training_set.num_classes).to(self.device)
        self.sampler = build_sampler(config, self.training_set, self.rank, self.world)
        tuple_size = self.sampler.tuple_size if isinstance(self.sampler, TupleBatchSampler) else None
        self.module = TrainModule(self.model, self.loss, tuple_size)
        self.ddp: nn.Module = self.module
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=ids)

    def _build_optimisation(self) -> None:
        """AdamW and the warm-up + cosine schedule over the configured epochs (or optim.schedule_steps)."""
        o = self.config.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.loss, o.lr, o.backbone_lr_mult,
                                                        o.weight_decay), lr=o.lr)
        self.steps_per_epoch = max(1, len(self.sampler) // o.accum_steps)
        # The schedule spans the configured epochs; max_steps / max_minutes only stop early, so a run
        # stopped and resumed follows the same schedule as an uninterrupted one.
        schedule_steps = o.schedule_steps or self.steps_per_epoch * o.epochs
        self.total_steps = schedule_steps
        if self.config.run.max_steps is not None:
            self.total_steps = min(self.total_steps, self.config.run.max_steps)
        warmup = min(o.warmup_steps, schedule_steps // 2 or 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup, schedule_steps, o.min_lr_ratio))

    def _tensorboard(self) -> Any:
        """A TensorBoard ``SummaryWriter`` into the run folder."""
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
            "config": json.dumps(plain(asdict(self.config))),
            # metrics.jsonl up to this state: a resume cuts off what was logged after it (logged again)
            "metrics_bytes": metrics_size(self.out),
            "cleaning": None if self.cleaning is None else self.cleaning.state(),
        }

    def save(self) -> None:
        """Write ``last.safetensors`` and ``state.pt`` atomically (rank 0)."""
        self._check_finite_weights()
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, self.out / "last.safetensors",
                        metadata={"step": self.step, "epoch": self.epoch, "train_run": str(self.out.resolve())})
        with atomic_path(self.out / STATE_FILE) as tmp:
            torch.save(self.state_dict(), tmp)

    def _load_state(self) -> None:
        """Restore what :meth:`state_dict` saved, after checking that the run's settings match."""
        path = self.out / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} not found (start without --resume, or check run.out)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot resume: {path} is not a readable training state ({err})") from err
        diffs = settings_differences(json.loads(state["config"]), plain(asdict(self.config)))
        if diffs:
            raise CheckpointError(f"cannot resume {path}: the run was started with other settings for "
                                  f"{', '.join(diffs[:5])}; resume with the same config")
        if state.get("cleaning") is not None:  # the cleaned set, sampler and loss first: the states below fit them
            apply_cleaning(self, Cleaning.from_state(state["cleaning"]))
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.best, self.skipped = state["best"], state["skipped"]
        set_rng_state(state["rng"])
        if self.rank == 0:
            truncate_metrics(self.out / METRICS_FILE, state.get("metrics_bytes"), self.step)

    # ---------------------------------------------------------------------------------- loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("step", "epoch"):
                    self.writer.add_scalar(key, value, record.get("step", self.step))

    def _loader(self) -> DataLoader:
        from dtop.data.training import collate_skip_bad, collate_tuples

        self.dataset.epoch = self.epoch
        workers = self.config.data.num_workers
        collate = functools.partial(collate_tuples, tuple_size=self.sampler.tuple_size) \
            if isinstance(self.sampler, TupleBatchSampler) else collate_skip_bad
        return DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate,
                          num_workers=workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=2 if workers else None)

    def train(self) -> dict[str, Any]:
        """Train until the epochs, ``max_steps`` or ``max_minutes`` run out; returns a summary."""
        c = self.config
        start = time.monotonic()
        deadline = start + 60 * c.run.max_minutes if c.run.max_minutes else None
        self.module.train()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                   disable=not c.run.progress or self.rank != 0)
        self._images_seen, self._last_log = 0, time.monotonic()
        stopped = False
        while self.epoch < c.optim.epochs and not stopped:
            stopped = self._run_epoch(bar, deadline)
            if not stopped:
                self._end_epoch()
        bar.close()
        return self._finish(start)

    def _run_epoch(self, bar: tqdm, deadline: float | None) -> bool:
        """The epoch's batches from the sampler's position on; True when a stop condition was met."""
        c = self.config
        micro, loss_sum = 0, 0.0
        if isinstance(self.sampler, TupleBatchSampler):
            self.mine()
        for images, labels, n_skipped in self._loader():
            self.skipped += int(n_skipped)
            self.batches_done += 1
            if images is None:
                continue
            sync = (micro + 1) % c.optim.accum_steps == 0
            loss_sum += self._forward_backward(images, labels, sync)
            micro += 1
            if not sync:
                continue
            self._optimizer_step()
            bar.update(1)
            if self.step % c.run.log_every == 0 or self.step == 1:
                self._log_step(loss_sum, bar)
            loss_sum = 0.0
            if self.step % c.run.save_every == 0:
                self.save()
            if (c.run.max_steps is not None and self.step >= c.run.max_steps) or \
                    (deadline is not None and time.monotonic() > deadline):
                return True
        return False

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor | None, sync: bool) -> float:
        """Loss and gradients of one micro-batch (gradients synchronised across ranks when ``sync``)."""
        images = images.to(self.device, non_blocking=True)
        if self.config.run.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        ctx: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if not sync and isinstance(self.ddp, nn.parallel.DistributedDataParallel):
            ctx = self.ddp.no_sync()  # accumulate locally; the sync step all-reduces
        with ctx, autocast_context(self.device, self.amp):
            loss = self.ddp(images, labels) / self.config.optim.accum_steps
        value = float(loss.detach())
        self._check_finite("the loss", value)
        self.scaler.scale(loss).backward()
        self._images_seen += images.shape[0]
        return value

    def _optimizer_step(self) -> None:
        """Clip, step the optimiser and the schedule, count the step."""
        clip = self.config.optim.grad_clip
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip)
            if not self.scaler.is_enabled():  # fp16: the scaler skips steps with inf gradients by design
                self._check_finite("the gradient norm", float(norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _check_finite(self, what: str, value: float) -> None:
        """Stop, on every rank at once, when ``value`` (of the step being made) is not finite."""
        bad = not math.isfinite(value)
        if self.world > 1:  # one rank stopping alone would leave the others waiting in the all-reduce
            flag = torch.tensor([float(bad)], device=self.device)
            torch.distributed.all_reduce(flag)
            bad = bool(flag.item())
        if bad:
            raise TrainingError(
                f"{what} is not finite ({value}) at step {self.step + 1} (epoch {self.epoch}); training stopped "
                f"before changing the weights. {diverged_hint(self.out, self.config.optim)}"
            )

    def _check_finite_weights(self) -> None:
        """Never save NaN or infinite weights: stop naming the step instead."""
        if all(bool(torch.isfinite(p).all()) for p in self.module.parameters()):
            return
        raise TrainingError(f"the weights are not finite after step {self.step} (epoch {self.epoch}); nothing was "
                            f"saved over {self.out / 'last.safetensors'}. {diverged_hint(self.out, self.config.optim)}")

    def _check_progress(self) -> None:
        """A finished epoch without a single optimiser step is an error (not an untrained checkpoint)."""
        if self.step > 0:
            return
        reason = no_step_reason(self.config.data, self.config.optim, len(self.training_set.paths), self.skipped,
                                len(self.sampler))
        raise TrainingError(f"training made no optimiser step in epoch {self.epoch}: {reason}. Nothing was saved.")

    def _log_step(self, loss: float, bar: tqdm) -> None:
        """Record loss, learning rate and throughput since the last record."""
        now = time.monotonic()
        rate = self._images_seen * self.world / max(now - self._last_log, 1e-9)
        self._log({"step": self.step, "epoch": self.epoch, "loss": loss, "lr": self.optimizer.param_groups[-1]["lr"],
                   "images_per_s": rate, "skipped": self.skipped})
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.1f}")
        self._images_seen, self._last_log = 0, now

    def _end_epoch(self) -> None:
        """Move to the next epoch; validate when due; save."""
        self._check_progress()
        self.epoch += 1
        self.batches_done = 0
        self.sampler.set_epoch(self.epoch)
        maybe_clean(self)  # at the end of epoch loss.clean_after_epoch
        val = self.config.val
        if val.dataset and self.epoch % val.every_epochs == 0:
            self.validate()
        self.save()

    def _finish(self, start: float) -> dict[str, Any]:
        """Save (and validate a run that never did), log and return the summary."""
        c = self.config
        self._check_progress()
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
        if not isinstance(self.sampler, TupleBatchSampler):
            raise ConfigError("mining hard negatives needs loss.name=contrastive")
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
        from dtop.engine.extract import extract

        mine = list(indices)[self.rank :: self.world]
        self.model.eval()
        try:
            part = extract(self.model, [self.training_set.paths[i] for i in mine],
                           settings=ExtractSettings(image_size=self.config.data.train_size, scales=[1.0]),
                           batch_size=self.config.loss.mining_batch_size, num_workers=self.config.data.num_workers,
                           device=self.device, amp=self.amp, skip_bad=True)
        finally:
            self.model.train()
        return part if self.world == 1 else self._gather_strided(part, len(indices))

    def _gather_strided(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """All ranks' rows ``r::world`` of an (n, d) matrix, gathered into the whole matrix (CPU)."""
        rows = -(-n // self.world)
        padded = torch.zeros(rows, part.shape[1], device=self.device)
        padded[: len(part)] = part.to(self.device)
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, padded)
        out = torch.empty(n, part.shape[1])
        for r, g in enumerate(gathered):
            n_r = len(range(r, n, self.world))
            out[r :: self.world] = g[:n_r].cpu()
        return out

    def validate(self) -> float | None:
        """Revisited evaluation (rank 0, in memory); keeps ``best.safetensors``. Returns mean of M/H mAP."""
        self._check_finite_weights()
        value = self._validation_map() if self.rank == 0 else None
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            save_checkpoint(self.model, self.out / "best.safetensors",
                            metadata={"step": self.step, "epoch": self.epoch, "val_map": value,
                                      "train_run": str(self.out.resolve())})
        if self.world > 1:
            torch.distributed.barrier()
        return value

    def _validation_map(self) -> float:
        """Mean of the Medium and Hard mAP on ``val.dataset`` (all protocols logged)."""
        from dtop.data.revisited import RevisitedDataset
        from dtop.engine.extract import extract
        from dtop.retrieval.metrics import evaluate_scores

        v = self.config.val
        if v.dataset is None:
            raise ConfigError("validation needs val.dataset (roxford5k, rparis6k or a revisited-format folder)")
        ds = RevisitedDataset(v.data_root, v.dataset)
        settings = ExtractSettings(image_size=v.image_size, scales=v.scales)
        self.model.eval()
        q = extract(self.model, ds.query_paths, bbxs=ds.query_bbxs, settings=settings, batch_size=v.batch_size,
                    device=self.device, amp=self.amp)
        x = extract(self.model, ds.database_paths, settings=settings, batch_size=v.batch_size, device=self.device,
                    amp=self.amp)
        self.model.train()
        results = evaluate_scores(q @ x.T, ds.gnd)
        value = (results["medium"]["map"] + results["hard"]["map"]) / 2
        self._log({"step": self.step, "epoch": self.epoch, "val_map_easy": results["easy"]["map"],
                   "val_map_medium": results["medium"]["map"], "val_map_hard": results["hard"]["map"],
                   "val_map": value})
        return value


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train a model as ``config`` says (see :class:`Trainer`); returns a summary.

    Without ``resume``, a ``run.out`` that holds a previous run is refused unless ``overwrite``.
    """
    return Trainer(config, resume=resume, overwrite=overwrite).train()
