"""``dtop demo``: dtop's whole job on built-in data, offline, in a few minutes on a CPU.

1. generate the built-in benchmark (:mod:`dtop.apps.synthetic`, revisited format + training split);
2. train the tiny DToP on the training split, and the CLS-only and GeM-tokens heads the same way;
3. evaluate them and the untrained tiny DToP under the revisited protocol;
4. print the results table and write the HTML report.

The time budget (``minutes``) is split between the three trainings; each stops when its share is
spent (the learning-rate schedule spans the configured epochs, see :mod:`dtop.engine.train`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dtop.engine.train_config import load_train_config
from dtop.models.factory import builtin_config_dir

DEMO_HEADS = {"dtop": "dtop_tiny", "cls": "cls_tiny", "gem-tokens": "gem_tokens_tiny"}
IMAGE_SIZE = 96


def _train_config(head: str, data_dir: Path, out: Path, minutes: float, device: str, epochs: int,
                  max_steps: int | None = None):
    base = builtin_config_dir().parent / "train" / "tiny.yaml"
    arch = {"dtop": "dtop", "cls": "cls", "gem-tokens": "gem-tokens"}[head]
    overrides = [
        f"model.arch={arch}", f"data.root={data_dir}", f"run.out={out}", f"run.max_minutes={minutes}",
        f"optim.epochs={epochs}", f"run.device={device}", f"data.train_size={IMAGE_SIZE}", "optim.batch_size=32",
        "optim.lr=0.001", "optim.warmup_steps=20", "loss.margin=0.0", "loss.scale=16",
        "run.log_every=5", "run.save_every=100000", "run.progress=false",
    ]
    if head != "dtop":
        overrides.append("model.locality=none")
    if max_steps is not None:
        overrides.append(f"run.max_steps={max_steps}")
    return load_train_config(str(base), overrides)


def run_demo(out: str | Path = "runs/demo", minutes: float = 5.0, device: str = "auto", seed: int = 0,
             epochs: int = 6, benchmark: dict[str, Any] | None = None, report: bool = True,
             workers: int = 2, max_steps: int | None = None) -> dict[str, Any]:
    """Run the demo into ``out``; returns the evaluation payload (see :func:`run_evaluation`).

    ``max_steps`` caps each training by steps instead of time only (reproducible, for tests).
    """
    from dtop.apps.synthetic import generate_benchmark
    from dtop.engine.evaluate import format_table, run_evaluation
    from dtop.engine.extract import ExtractSettings
    from dtop.engine.train import train
    from dtop.models import build_model, load_model

    out = Path(out)
    start = time.monotonic()
    bench = generate_benchmark(out / "data", seed=seed, **(benchmark or {}))
    data_root, name, train_dir = Path(bench["root"]), bench["name"], Path(bench["train_dir"])
    print(f"[demo] benchmark {name}: {bench['counts']} ({time.monotonic() - start:.0f} s)", flush=True)

    share = max(0.1, minutes * 0.8 / len(DEMO_HEADS))  # 80 % of the budget trains, the rest evaluates
    models, runs = [], {}
    for head, config_name in DEMO_HEADS.items():
        run_dir = out / "train" / head
        cfg = _train_config(head, train_dir, run_dir, share, device, epochs, max_steps)
        cfg.data.num_workers = workers
        print(f"[demo] training {config_name} for up to {share:.1f} min", flush=True)
        summary = train(cfg, overwrite=True)  # a demo run again into the same --out starts over
        print(f"[demo]   {summary['steps']} steps, {summary['epochs']} epochs", flush=True)
        label = f"{config_name} (trained)"
        models.append((label, str(run_dir / "last.safetensors"), load_model(run_dir / "last.safetensors")))
        runs[label] = str(run_dir.resolve())
    models.insert(1, ("dtop_tiny (untrained)", "dtop_tiny", build_model("dtop_tiny")))
    settings = ExtractSettings(image_size=IMAGE_SIZE, scales=[1.0])
    payload = run_evaluation(models, data_root, name, out / "evaluation", settings=settings, topk=20,
                             train_runs=runs, batch_size=32, num_workers=workers, device=device, progress=False)
    print(format_table(payload["models"]), flush=True)
    if report:
        from dtop.report import build_report

        heat = [(label, model) for label, _, model in models if "untrained" not in label][:2]
        index = build_report(out / "evaluation", out / "report", topk=10, heatmap_models=heat)
        print(f"[demo] report: {index}", flush=True)
    print(f"[demo] done in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    return payload
