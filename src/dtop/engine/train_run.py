"""The run folder of a training job: its files, a new run over an old one, metrics cut back on
resume, settings compared on resume, and the messages of a run that cannot go on."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from dtop.engine.train_config import DataConfig, OptimConfig, resolved_subcenters
from dtop.errors import ConfigError
from dtop.utils.io import write_text

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
#: The files of a run folder that a new run (without resume) would replace.
RUN_FILES = (STATE_FILE, METRICS_FILE, "last.safetensors", "best.safetensors")


def check_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run over a previous one (its checkpoints and metrics), unless ``overwrite``."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or overwrite:
        return
    raise ConfigError(
        f"run.out={out} already holds a training run ({', '.join(found)}): add --resume to continue it, "
        "--overwrite to start over (its files are replaced), or set run.out to a new folder"
    )


def clear_run(out: Path) -> None:
    """Delete the files of a previous run in ``out`` (a new run with ``overwrite``)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def metrics_size(out: Path) -> int:
    """The size of ``out/metrics.jsonl`` (0 when there is none)."""
    path = out / METRICS_FILE
    return path.stat().st_size if path.is_file() else 0


def truncate_metrics(path: Path, size: int | None, step: int) -> None:
    """Cut ``metrics.jsonl`` back to what was logged up to the resumed state (``size`` bytes).

    A state written before the size was recorded: keep the records of steps up to ``step`` (an
    ``end`` record or a cut-off last line goes too).
    """
    if not path.is_file():
        return
    if size is not None:
        if path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") != "end" and record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key`` of the model, data and loss settings on which two run configs differ."""
    for config in (saved, current):
        # resolved: a state written before the per-loss default holds 1, the config None
        loss = config["loss"]
        loss["subcenters"] = resolved_subcenters(loss["name"], loss.get("subcenters"))
    return [f"{s}.{k}" for s in ("model", "data", "loss") for k in saved[s] if saved[s][k] != current[s].get(k)]


def plain(obj: Any) -> Any:
    """Tuples → lists, so that configs compare equal after a JSON round trip."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


def diverged_hint(out: Path, optim: OptimConfig) -> str:
    """What to do when the loss or the weights stop being finite."""
    saved = (f"the last save ({out / 'last.safetensors'}) can be resumed with --resume after the change"
             if (out / STATE_FILE).is_file() else "no checkpoint was saved yet")
    return (f"Lower optim.lr (now {optim.lr:g}){' or use optim.amp=bf16' if optim.amp == 'fp16' else ''}, or "
            f"check the training data; {saved}.")


def no_step_reason(data: DataConfig, optim: OptimConfig, images: int, skipped: int, batches: int) -> str:
    """Why an epoch made no optimiser step; with unreadable images, the command that lists them."""
    if skipped:
        command = ["dtop", "data", "check", data.root, "--format", data.format]
        if data.csv:
            command += ["--csv", data.csv]
        if data.exclude:
            command += ["--exclude", data.exclude]
        return (f"{skipped} image(s) of {images} were unreadable and no batch was left; find them with "
                f"`{shlex.join(command)}`")
    return (f"an epoch of {images} images gives {batches} batch(es) of optim.batch_size={optim.batch_size}, "
            f"fewer than optim.accum_steps={optim.accum_steps}; lower optim.batch_size or optim.accum_steps")
