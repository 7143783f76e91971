"""``dtop plot``: training curves of runs as PNG files (hand-written runs and one real tiny run)."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_TRAIN_CONFIG
from dtop.cli.main import main
from dtop.report.curves import read_metrics, run_charts
from dtop.report.plots import plot_runs

SIZE = (800, 450)  # (width, height) of the PNG files with the default --size 450x800


def write_run(run: Path, steps: int = 30, val_every: int | None = 10, scale: float = 3.0, end: bool = True) -> Path:
    """A metrics.jsonl in the format of ``Trainer._log``: step records, validation records, the end event."""
    run.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "epoch": s // 10, "loss": scale * math.exp(-s / 10) + 0.1,
                      "lr": 1e-3 * min(1.0, s / 5), "images_per_s": 40.0, "skipped": 0})
        if val_every and s % val_every == 0:
            lines.append({"step": s, "epoch": s // 10, "val_map_easy": 0.5 + s / 100, "val_map_medium": 0.3 + s / 100,
                          "val_map_hard": 0.1 + s / 100, "val_map": 0.2 + s / 100})
    if end:
        lines.append({"event": "end", "steps": steps, "epochs": steps // 10, "skipped_images": 0, "best_val": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file, checking its format."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def written(out: str) -> list[Path]:
    return [Path(line.removeprefix("wrote ")) for line in out.splitlines() if line.startswith("wrote ")]


def test_one_run_writes_loss_lr_and_val_map(tmp_path, capsys):
    run = write_run(tmp_path / "run-a")
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    expected = [run / "plots" / name for name in ("loss.png", "lr.png", "val_map.png")]
    assert written(out) == expected
    assert all(png_size(path) == SIZE for path in expected)
    assert not list((run / "plots").glob(".*"))  # no temporary files left by the atomic writes
    # The data behind the figures: one run, every series of it, against the step.
    charts = run_charts([run])
    assert [c.key for c in charts.charts] == ["loss", "lr", "validation"]
    loss = charts.get("loss")
    assert loss.title == "run-a: training loss" and loss.labels == ["loss"] and not loss.legend
    assert loss.get("loss").x == list(range(1, 31))
    assert loss.get("loss").y == pytest.approx([3.0 * math.exp(-s / 10) + 0.1 for s in range(1, 31)])
    assert charts.get("lr").get("lr").y[4:] == [1e-3] * 26
    # val_map.png: val_map_easy, _medium, _hard and val_map, with a legend.
    validation = charts.get("validation")
    assert validation.labels == ["val_map_easy", "val_map_medium", "val_map_hard", "val_map"] and validation.legend
    assert validation.get("val_map").x == [10, 20, 30]
    assert validation.get("val_map").y == pytest.approx([0.3, 0.4, 0.5])


def test_no_validation_no_val_map_and_out_option(tmp_path, capsys):
    run = write_run(tmp_path / "run", val_every=None, end=False)
    assert main(["plot", str(run), "--out", str(tmp_path / "figs"), "--size", "360x640"]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["loss.png", "lr.png"]
    assert not (run / "plots").exists()
    assert "no validation records" in captured.err
    assert png_size(tmp_path / "figs" / "loss.png") == (640, 360)  # --size is HxW
    result = plot_runs([run], tmp_path / "lib", height=200, width=300)
    assert result.messages == ["run: no validation records"]
    assert [p.name for p in result.paths] == ["loss.png", "lr.png"] and result.charts[0].key == "loss"
    assert png_size(result.paths[0]) == (300, 200)


def test_metrics_file_path_is_accepted(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=5, val_every=None)
    assert main(["plot", str(run / "metrics.jsonl")]) == 0
    assert (run / "plots" / "loss.png").is_file()
    # As a run of an overlay, it is labelled with its folder name: the same charts as with the folder.
    other = write_run(tmp_path / "other", steps=5, val_every=None, scale=1.0)
    assert main(["plot", str(run / "metrics.jsonl"), str(other), "--out", str(tmp_path / "o1")]) == 0
    assert (tmp_path / "o1" / "loss.png").is_file()
    assert run_charts([run / "metrics.jsonl", other]) == run_charts([run, other])
    assert run_charts([run / "metrics.jsonl", other]).get("loss").labels == ["run", "other"]


def test_two_runs_are_overlaid(tmp_path, capsys):
    a = write_run(tmp_path / "alpha", scale=3.0)
    b = write_run(tmp_path / "beta", steps=20, val_every=None, scale=1.0)
    # Several runs and no --out: an error, nothing written into the runs.
    assert main(["plot", str(a), str(b)]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (a / "plots").exists() and not (b / "plots").exists()

    out = tmp_path / "compare"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert written(capsys.readouterr().out) == [out / "loss.png", out / "lr.png", out / "val_map.png"]
    charts = run_charts([a, b])
    for key in ("loss", "lr"):  # one line per run, with a legend
        chart = charts.get(key)
        assert chart.labels == ["alpha", "beta"] and chart.legend
        assert len(chart.get("alpha").x) == 30 and len(chart.get("beta").x) == 20
    assert charts.get("loss").title == "training loss"
    assert charts.get("loss").get("beta").y[0] == pytest.approx(math.exp(-0.1) + 0.1)
    # Only alpha was validated: val_map of alpha alone (not its easy/medium/hard).
    assert charts.get("validation").labels == ["alpha"]
    assert charts.get("validation").get("alpha").y == pytest.approx([0.3, 0.4, 0.5])
    assert charts.messages == ["beta: no validation records"]


def test_legend_names_the_runs(tmp_path, capsys):
    """The lines of an overlay are named after the run folders (not their parents), the full path if equal."""
    a, b = write_run(tmp_path / "a" / "x"), write_run(tmp_path / "b" / "yyyyyyyyyy", scale=1.0)
    same_name, other_name = write_run(tmp_path / "c" / "x"), write_run(tmp_path / "c" / "zzzzzz")
    for out, first in (("o1", a), ("o2", same_name), ("o3", other_name)):
        assert main(["plot", str(first), str(b), "--out", str(tmp_path / out)]) == 0
        assert (tmp_path / out / "loss.png").is_file()
    assert run_charts([a, b]).get("loss").labels == ["x", "yyyyyyyyyy"]
    assert run_charts([same_name, b]).get("loss").labels == ["x", "yyyyyyyyyy"]
    assert run_charts([other_name, b]).get("loss").labels == ["zzzzzz", "yyyyyyyyyy"]
    assert run_charts([a, same_name]).get("loss").labels == [str(a), str(same_name)]
    assert run_charts([a, a]).get("loss").labels == [str(a), f"{a} (2)"]


def test_incomplete_last_line_is_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=12, end=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss"')  # a killed run: the last write cut off
    assert main(["plot", str(run)]) == 0
    assert "line 14: skipped an incomplete last line" in capsys.readouterr().err
    assert (run / "plots" / "loss.png").is_file()
    charts = run_charts([run])
    assert charts.get("loss").get("loss").x == list(range(1, 13))  # the cut-off step 13 is left out
    assert charts.messages == [f"{run / 'metrics.jsonl'}, line 14: skipped an incomplete last line (a killed run "
                               "or one still writing)"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such training run folder"),
    ("no-metrics", "no metrics.jsonl"),
    ("corrupt", "metrics.jsonl, line 3: corrupt record: not valid JSON"),
    ("not-an-object", "metrics.jsonl, line 2: corrupt record: a JSON array, not an object"),
    ("binary", "metrics.jsonl, line 2: corrupt record: not UTF-8 text"),
    ("no-steps", "no step records"),
    ("empty", "no step records"),
])
def test_bad_input_fails_clearly(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    good = '{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.0, "lr": 0.1}\n'
    if case != "missing":
        run.mkdir()
    content = {
        "corrupt": good + "{not json}\n" + '{"step": 3, "loss": 0.5}\n',
        "not-an-object": good[: good.index("\n") + 1] + "[1, 2]\n" + good,
        "no-steps": '{"step": 5, "val_map": 0.3}\n{"event": "end", "steps": 0}\n',
        "empty": "\n",
    }.get(case)
    if case == "binary":
        (run / "metrics.jsonl").write_bytes(good.splitlines(True)[0].encode() + b'{"step": 2, "loss": "\xff"}\n')
    elif content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["plot", str(run)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not (run / "plots").exists()


def test_corrupt_second_run_writes_nothing(tmp_path, capsys):
    good = write_run(tmp_path / "good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5\n{"step": 3, "loss": 0.2}\n')
    assert main(["plot", str(good), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad / 'metrics.jsonl'}, line 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("size", ["800x", "wide", "100x800", "450x150"])
def test_bad_size_is_an_error(tmp_path, capsys, size):
    run = write_run(tmp_path / "run", steps=3)
    assert main(["plot", str(run), "--size", size]) == 2
    assert "--size must be HxW (height x width) with at least 120x200 pixels" in capsys.readouterr().err
    assert not (run / "plots").exists()


def test_one_number_is_a_square(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=3)
    assert main(["plot", str(run), "--size", "300"]) == 0
    assert png_size(run / "plots" / "loss.png") == (300, 300)


def test_read_metrics_strict_and_lenient(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\nnot json\n{"step": 2}\n')
    assert [r["step"] for r in read_metrics(path).records] == [1, 2]  # lenient: as the report reads them
    from dtop.errors import DataError

    with pytest.raises(DataError, match=r"m.jsonl, line 3"):
        read_metrics(path, strict=True)


def test_real_training_run(tmp_path, capsys):
    """A tiny real `dtop train` run (2 epochs, validated after each) plots loss, lr and val_map."""
    from dtop.apps.synthetic import generate_benchmark

    root = tmp_path / "data"
    bench = generate_benchmark(root, "mini", n_train_instances=4, n_test_instances=3, train_views=3,
                               n_distractors=4, image_size=64)
    run = tmp_path / "run"
    assert main(["train", "--config", TINY_TRAIN_CONFIG, f"data.root={bench['train_dir']}", f"run.out={run}",
                 "data.train_size=48", "data.num_workers=0", "optim.batch_size=4", "run.progress=false",
                 "run.log_every=1", "optim.epochs=2", "val.dataset=mini", f"val.data_root={root}",
                 "val.image_size=64", "run.device=cpu"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_map" in r for r in records) == 2 and records[-1]["event"] == "end"
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert written(capsys.readouterr().out) == [run / "plots" / n for n in ("loss.png", "lr.png", "val_map.png")]
    assert all(png_size(run / "plots" / name) == SIZE for name in ("loss.png", "lr.png", "val_map.png"))
    charts = run_charts([run])
    steps = [r["step"] for r in records if "loss" in r]
    assert charts.get("loss").get("loss").x == steps and len(steps) >= 2
    assert charts.get("lr").get("lr").x == steps
    assert len(charts.get("validation").get("val_map").x) == 2
    assert {"val_map", "val_map_medium", "val_map_hard"} <= set(charts.get("validation").labels)


def test_contrastive_mining_records_give_a_negatives_plot(tmp_path, capsys):
    run = write_run(tmp_path / "tuples", val_every=None, end=False)
    with open(run / "metrics.jsonl", "a") as f:
        for epoch in range(3):  # as Trainer.mine logs them, one per epoch
            f.write(json.dumps({"event": "mining", "step": 10 * epoch, "epoch": epoch,
                                "mean_negative_distance": 0.2 + 0.05 * epoch, "mining_seconds": 1.0}) + "\n")
    assert main(["plot", str(run)]) == 0
    paths = written(capsys.readouterr().out)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "negatives.png"]
    assert png_size(run / "plots" / "negatives.png") == SIZE
    mining = run_charts([run]).get("mining")
    assert mining.title == "tuples: mean distance to the mined hard negatives"
    assert mining.get("mean_negative_distance").x == [0, 10, 20]
    assert mining.get("mean_negative_distance").y == pytest.approx([0.2, 0.25, 0.3])
