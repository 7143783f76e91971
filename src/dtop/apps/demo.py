"""``dtop demo``: dtop's whole job on built-in data, offline, in a few minutes on a CPU.

Generate the built-in benchmark, train DToP and its baselines for the same fixed number of steps,
evaluate them with untrained references under the revisited protocol, and write the HTML report.
With the packaged ImageNet weights the models stand on a pretrained EfficientNet-Lite0; without
them the tiny models train from scratch (docs/apps.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtop.engine.train_config import TrainConfig, load_train_config
from dtop.models.factory import builtin_config_dir, resolve_model_config
from dtop.models.sources import packaged_weights

log = logging.getLogger(__name__)

#: Training steps of every trained row: fixed, so that the table is the same for a seed everywhere.
DEMO_STEPS = 200
IMAGE_SIZE = 96
BATCH_SIZE = 32
#: The pretrained CNN's layers up to this stride keep their ImageNet weights in training.
FREEZE_STRIDE = 4
#: The packaged weights the pretrained demo needs.
DEMO_WEIGHTS = ("efficientnet_lite0", "tf_in1k")


@dataclass(frozen=True)
class DemoRow:
    """A row of the demo's table: a registered model, trained by the demo or evaluated as built."""

    label: str
    model: str
    trained: bool


#: The demo on the pretrained EfficientNet-Lite0 stem (the off-the-shelf CNN first, DToP next).
PRETRAINED_ROWS = (
    DemoRow("gem_cnn_lite (off-the-shelf)", "gem_cnn_lite", False),
    DemoRow("dtop_lite (untrained)", "dtop_lite", False),
    DemoRow("dtop_lite (trained)", "dtop_lite", True),
    DemoRow("cls_lite (trained)", "cls_lite", True),
    DemoRow("gem_tokens_lite (trained)", "gem_tokens_lite", True),
    DemoRow("gem_cnn_lite (fine-tuned)", "gem_cnn_lite", True),
)
#: The from-scratch demo (no pretrained weights available).
SCRATCH_ROWS = (
    DemoRow("dtop_tiny (trained)", "dtop_tiny", True),
    DemoRow("dtop_tiny (untrained)", "dtop_tiny", False),
    DemoRow("cls_tiny (trained)", "cls_tiny", True),
    DemoRow("gem_tokens_tiny (trained)", "gem_tokens_tiny", True),
)


@dataclass
class DemoResult:
    """What the demo produced: the evaluation payload, its table, the report and the time per stage."""

    payload: dict[str, Any]
    table: str
    pretrained: bool
    report: Path | None = None
    #: (stage, seconds) in the order the stages ran
    stages: list[tuple[str, float]] = field(default_factory=list)

    def stage_lines(self) -> list[str]:
        """One line per stage with its elapsed time, then the total."""
        lines = [f"{name:<34} {seconds:7.1f} s" for name, seconds in self.stages]
        return lines + [f"{'total':<34} {sum(s for _, s in self.stages):7.1f} s"]


def demo_workers(cores: int | None = None) -> int:
    """Decoding workers of the demo: none on 2 cores or fewer, where they take the cores torch computes on.

    Measured on 2 cores, 60 ``dtop_lite`` steps: 21.4 s decoding in the loop, 25.9 s with 2 workers.
    """
    from dtop.engine.runtime import available_cores

    return 0 if (cores or available_cores()) <= 2 else 2


def pretrained_weights_available() -> bool:
    """True if the packaged ImageNet weights of the demo's stem are installed."""
    source = packaged_weights(*DEMO_WEIGHTS)
    return source is not None and source.locate() is not None


def train_config(row: DemoRow, data_dir: Path, out: Path, steps: int, device: str, workers: int,
                 pretrained: bool) -> TrainConfig:
    """The demo's training recipe for ``row``: normalised softmax, AdamW, ``steps`` steps of 32 images.

    Pretrained parts learn at 0.1× the rate, except the CNN's layers up to stride 4, which stay
    fixed; new layers (the head, a ViT on the CNN stem) learn at the full rate.
    """
    base = builtin_config_dir().parent / "train" / "tiny.yaml"
    overrides = [
        f"data.root={data_dir}", f"run.out={out}", f"run.device={device}", f"data.train_size={IMAGE_SIZE}",
        f"data.num_workers={workers}", f"optim.batch_size={BATCH_SIZE}", "optim.lr=0.001",
        f"optim.backbone_lr_mult={0.1 if pretrained else 1.0}", "optim.warmup_steps=10",
        # the pretrained CNN's layers up to stride 4 keep their weights (no backward through them)
        f"optim.freeze_stride={FREEZE_STRIDE if pretrained else 0}",
        # a constant rate after the warm-up: the schedule spans far more epochs than the steps reach
        "optim.epochs=1000", f"run.max_steps={steps}",
        "loss.margin=0.0", "loss.scale=16", "run.log_every=5", "run.save_every=1000000", "run.progress=false",
    ]
    cfg = load_train_config(str(base), overrides)
    cfg.model = resolve_model_config(row.model)
    return cfg


class _Stages:
    """Times the demo's stages and logs each as it ends."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        log.info("[demo] %s ...", name)
        start = time.monotonic()
        yield
        self.times.append((name, time.monotonic() - start))
        log.info("[demo] %s: %.1f s", name, self.times[-1][1])


def run_demo(out: str | Path = "runs/demo", steps: int = DEMO_STEPS, device: str = "auto", seed: int = 0,
             benchmark: dict[str, Any] | None = None, report: bool = True, workers: int | None = None,
             pretrained: bool | None = None) -> DemoResult:
    """Run the demo into ``out`` and return its results.

    ``steps``: training steps of every trained row. ``workers``: decoding workers (None:
    :func:`demo_workers`). ``pretrained``: None uses the packaged ImageNet weights when they are
    installed; False forces the from-scratch demo.
    """
    from dtop.apps.synthetic import generate_benchmark
    from dtop.engine.evaluate import format_table, run_evaluation
    from dtop.engine.settings import ExtractSettings
    from dtop.models import build_model

    out = Path(out)
    workers = demo_workers() if workers is None else workers
    stage = _Stages()
    if pretrained is None:
        pretrained = pretrained_weights_available()
        if not pretrained:
            source = packaged_weights(*DEMO_WEIGHTS)
            hint = source.install_hint() if source is not None else ""
            log.warning("no pretrained weights (%s): running the from-scratch demo with the tiny models", hint)
    rows = PRETRAINED_ROWS if pretrained else SCRATCH_ROWS
    with stage("generate the benchmark"):
        bench = generate_benchmark(out / "data", seed=seed, **(benchmark or {}))
    data_root, name, train_dir = Path(bench["root"]), bench["name"], Path(bench["train_dir"])
    models: list[tuple[str, str, Any]] = []
    runs: dict[str, str | None] = {}
    for row in rows:
        if not row.trained:
            with stage(f"build {row.label}"):
                models.append((row.label, row.model, build_model(row.model)))
            continue
        models.append(_train_row(row, train_dir, out, steps, device, workers, pretrained, stage))
        runs[row.label] = str((out / "train" / row.model).resolve())
    settings = ExtractSettings(image_size=IMAGE_SIZE)  # the revisited protocol's 3 scales, as dtop evaluate
    with stage(f"evaluate {len(models)} models"):
        payload = run_evaluation(models, data_root, name, out / "evaluation", settings=settings, topk=20,
                                 train_runs=runs, batch_size=BATCH_SIZE, num_workers=workers, device=device,
                                 progress=False)
    result = DemoResult(payload, format_table(payload["models"]), pretrained, stages=stage.times)
    if report:
        from dtop.report import build_report

        heat = [(label, model) for label, _, model in models if label.endswith("(trained)")][:2]
        # the first screen: the trained DToP beside the first untrained row (the off-the-shelf CNN)
        reference = next(row.label for row in rows if not row.trained)
        compare = (heat[0][0], reference) if heat else None
        with stage("write the report"):
            result.report = build_report(out / "evaluation", out / "report", topk=10, heatmap_models=heat,
                                         compare=compare)
    return result


def _train_row(row: DemoRow, train_dir: Path, out: Path, steps: int, device: str, workers: int,
               pretrained: bool, stage: _Stages) -> tuple[str, str, Any]:
    """Train ``row`` for ``steps`` steps; its (label, checkpoint, model) for the evaluation."""
    from dtop.engine.train import train
    from dtop.models import load_model

    run_dir = out / "train" / row.model  # each model is trained once
    cfg = train_config(row, train_dir, run_dir, steps, device, workers, pretrained)
    with stage(f"train {row.label.split(' ')[0]} ({steps} steps)"):
        summary = train(cfg)
    log.info("[demo]   %s: %d steps, %d epochs", row.label, summary["steps"], summary["epochs"])
    checkpoint = run_dir / "last.safetensors"
    return row.label, str(checkpoint), load_model(checkpoint)
