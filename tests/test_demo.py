"""The demo end to end (shortened) and its report in a real headless browser."""

import json
import shutil

import pytest

from dtop.apps.demo import run_demo

SMALL = dict(n_train_instances=60, n_test_instances=35, train_views=5, n_distractors=60)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    payload = run_demo(out, minutes=30, device="cpu", benchmark=SMALL, workers=1, max_steps=30)
    return out, payload


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
def test_report_folder_is_complete(demo):
    out, _ = demo
    report = out / "report"
    html = (report / "index.html").read_text()
    import re

    sources = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(sources) > 70
    assert all((report / s).is_file() for s in sources)
    assert "heatmap" in html.lower() and "AP" in html


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
