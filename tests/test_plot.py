"""``dtop plot``: training curves of runs as PNG files (hand-written runs and one real tiny run)."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from dtop.cli.main import main
from dtop.report.plots import read_metrics

TINY = str(Path(__file__).parents[1] / "configs" / "train" / "tiny.yaml")
SIZE = (800, 450)


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


def colours(path: Path) -> dict[tuple[int, int, int], int]:
    """{colour: pixel count} of a PNG, checking its format and size."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == SIZE
        return {c: n for n, c in im.convert("RGB").getcolors(im.size[0] * im.size[1])}


def written(out: str) -> list[Path]:
    return [Path(line.removeprefix("wrote ")) for line in out.splitlines() if line.startswith("wrote ")]


# Line colours of dtop.report.plots.SERIES_COLOURS: the first series (run) and the second.
BLUE, RED = (31, 119, 180), (214, 39, 40)


def test_one_run_writes_loss_lr_and_val_map(tmp_path, capsys):
    run = write_run(tmp_path / "run-a")
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    expected = [run / "plots" / name for name in ("loss.png", "lr.png", "val_map.png")]
    assert written(out) == expected
    for path in expected:
        c = colours(path)
        assert len(c) > 10  # drawn: axes, text, curves
        assert c.get(BLUE, 0) > 600  # the curve of the run, not a "no data" image
    # val_map.png: val_map_easy, _medium, _hard and val_map, four colours; loss.png: one series.
    assert {(214, 39, 40), (44, 160, 44), (255, 127, 14)} <= set(colours(run / "plots" / "val_map.png"))
    assert RED not in colours(run / "plots" / "loss.png")
    assert not list((run / "plots").glob(".*"))  # no temporary files left by the atomic writes


def test_no_validation_no_val_map_and_out_option(tmp_path, capsys):
    run = write_run(tmp_path / "run", val_every=None, end=False)
    assert main(["plot", str(run), "--out", str(tmp_path / "figs"), "--size", "640x360"]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["loss.png", "lr.png"]
    assert not (run / "plots").exists()
    assert "no validation records" in captured.err
    with Image.open(tmp_path / "figs" / "loss.png") as im:
        assert im.size == (640, 360)


def test_metrics_file_path_is_accepted(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=5, val_every=None)
    assert main(["plot", str(run / "metrics.jsonl")]) == 0
    assert (run / "plots" / "loss.png").is_file()
    # As a run of an overlay, it is labelled with its folder name: the same image as with the folder.
    other = write_run(tmp_path / "other", steps=5, val_every=None, scale=1.0)
    assert main(["plot", str(run / "metrics.jsonl"), str(other), "--out", str(tmp_path / "o1")]) == 0
    assert main(["plot", str(run), str(other), "--out", str(tmp_path / "o2")]) == 0
    with Image.open(tmp_path / "o1" / "loss.png") as o1, Image.open(tmp_path / "o2" / "loss.png") as o2:
        assert o1.tobytes() == o2.tobytes()


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
    for name in ("loss.png", "lr.png"):
        c = colours(out / name)
        assert BLUE in c and RED in c  # one colour per run
    assert BLUE in colours(out / "val_map.png") and RED not in colours(out / "val_map.png")  # only alpha validated

    # A single run's plot differs from the overlay (the second curve and the legend are drawn).
    assert main(["plot", str(a), "--out", str(tmp_path / "single")]) == 0
    with Image.open(out / "loss.png") as both, Image.open(tmp_path / "single" / "loss.png") as one:
        assert both.tobytes() != one.tobytes()


def test_legend_names_the_runs(tmp_path, capsys):
    """With the same data, the overlay depends on the run folder names (the legend), not on their parents."""
    a, b = write_run(tmp_path / "a" / "x"), write_run(tmp_path / "b" / "yyyyyyyyyy", scale=1.0)
    same_name, other_name = write_run(tmp_path / "c" / "x"), write_run(tmp_path / "c" / "zzzzzz")
    for out, first in (("o1", a), ("o2", same_name), ("o3", other_name)):
        assert main(["plot", str(first), str(b), "--out", str(tmp_path / out)]) == 0
    with Image.open(tmp_path / "o1" / "loss.png") as o1, Image.open(tmp_path / "o2" / "loss.png") as o2, \
            Image.open(tmp_path / "o3" / "loss.png") as o3:
        assert o1.tobytes() == o2.tobytes()
        assert o1.tobytes() != o3.tobytes()


def test_incomplete_last_line_is_skipped(tmp_path, capsys):
    run = write_run(tmp_path / "run", steps=12, end=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss"')  # a killed run: the last write cut off
    assert main(["plot", str(run)]) == 0
    assert "line 14: skipped an incomplete last line" in capsys.readouterr().err
    assert (run / "plots" / "loss.png").is_file()


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


def test_bad_size_is_a_usage_error(tmp_path):
    run = write_run(tmp_path / "run", steps=3)
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(run), "--size", "800"])
    assert exc.value.code == 2


def test_read_metrics_strict_and_lenient(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\nnot json\n{"step": 2}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # lenient: as the report reads them
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
    assert main(["train", "--config", TINY, f"data.root={bench['train_dir']}", f"run.out={run}",
                 "data.train_size=48", "data.num_workers=0", "optim.batch_size=4", "run.progress=false",
                 "run.log_every=1", "optim.epochs=2", "val.dataset=mini", f"val.data_root={root}",
                 "val.image_size=64", "run.device=cpu"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_map" in r for r in records) == 2 and records[-1]["event"] == "end"
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert written(capsys.readouterr().out) == [run / "plots" / n for n in ("loss.png", "lr.png", "val_map.png")]
    for name in ("loss.png", "lr.png", "val_map.png"):
        c = colours(run / "plots" / name)
        assert len(c) > 10 and BLUE in c


def test_contrastive_mining_records_give_a_negatives_plot(tmp_path, capsys):
    run = write_run(tmp_path / "tuples", val_every=None, end=False)
    with open(run / "metrics.jsonl", "a") as f:
        for epoch in range(3):  # as Trainer.mine logs them, one per epoch
            f.write(json.dumps({"event": "mining", "step": 10 * epoch, "epoch": epoch,
                                "mean_negative_distance": 0.2 + 0.05 * epoch, "mining_seconds": 1.0}) + "\n")
    assert main(["plot", str(run)]) == 0
    paths = written(capsys.readouterr().out)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "negatives.png"]
    assert colours(run / "plots" / "negatives.png").get(BLUE, 0) > 300
