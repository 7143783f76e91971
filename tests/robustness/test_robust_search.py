"""`dtop search` with unreadable, missing, non-regular and oddly named queries, and bounded sizes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from dtop.utils.paths import show_path

from .hostile import TRIED, run_dtop

RUN = ["--workers", "0", "--no-progress"]


def test_unreadable_queries_are_reported_and_the_others_searched(hostile, tmp_path):
    """`dtop search` used to fail whole when one query was unreadable."""
    corpus, ix, _, _ = hostile
    good = corpus.good[0]
    fifo = tmp_path / "q.jpg"
    os.mkfifo(fifo)
    queries = [good, corpus.root / "empty.jpg", tmp_path / "missing.jpg", fifo, corpus.root / "corrupt-dds.jpg"]
    out_json = tmp_path / "r.json"
    result = run_dtop("search", "--index", ix, *queries, "--topk", "3", "--json", out_json, *RUN)
    assert result.code == 0, result.err
    blocks = result.out.split("query ")
    assert f"  1  1.0000  {show_path(good.resolve())}" in blocks[1] or "1.0000" in blocks[1]
    assert "(unreadable: empty file" in result.out
    assert "(unreadable: file not found" in result.out
    assert "(unreadable: not a regular file" in result.out
    assert "(unreadable: corrupt or unsupported image data (NotImplementedError" in result.out
    warning = [line for line in result.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "4 of 5 query image(s) unreadable" in warning[0]
    doc = json.loads(out_json.read_text())
    assert [("error" in q) for q in doc["queries"]] == [False, True, True, True, True]
    assert doc["queries"][0]["results"][0]["path"] == str(good.resolve())
    TRIED["query inputs"] += len(queries)


def test_all_queries_unreadable_is_one_error_line(hostile, tmp_path):
    corpus, ix, _, _ = hostile
    result = run_dtop("search", "--index", ix, corpus.root / "empty.jpg", tmp_path / "missing.jpg", *RUN)
    assert result.code == 2 and len(result.error_lines) == 1
    assert "no query image could be read" in result.err and "empty.jpg" in result.err
    TRIED["query inputs"] += 2


def test_odd_names_in_results_print_and_draw(hostile, tmp_path):
    """Defect 5: names that are not UTF-8 crashed printing; a newline in a name crashed the contact sheet."""
    corpus, ix, _, _ = hostile
    odd = [p for p in corpus.good if show_path(p.name) != p.name]
    assert odd, "the file system took none of the odd names"
    sheet = tmp_path / "s.png"
    result = run_dtop("search", "--index", ix, *odd, "--topk", "2", "--sheet", sheet, "--thumb", "32", *RUN)
    assert result.code == 0, result.err
    for path in odd:
        assert f"query {show_path(path)}" in result.out
    assert all(line.isprintable() for line in result.out.splitlines())
    with Image.open(sheet) as im:
        assert im.size[0] > 0
    TRIED["odd file names"] += len(odd)


@pytest.mark.parametrize("option, value, message", [
    ("--thumb", "60000", "thumbnail size must be 32 to 1024"), ("--thumb", "8", "thumbnail size must be 32 to 1024"),
    ("--topk", "0", "--topk must be from 1"), ("--topk", "1000000000", "--topk must be from 1"),
    ("--batch-size", "-3", "must be an integer from 1 to 4096"), ("--workers", "-1", "must be an integer from 0"),
])
def test_size_options_are_bounded_before_any_work(hostile, tmp_path, option, value, message):
    """Defect 9: `--sheet s.png --thumb 60000` grew to 22 GB before it was killed."""
    corpus, ix, _, _ = hostile
    start = time.perf_counter()
    result = run_dtop("search", "--index", ix, corpus.good[0], *RUN, "--sheet", tmp_path / "s.png", option, value)
    assert result.code == 2 and len(result.error_lines) == 1 and message in result.err and option in result.err
    assert time.perf_counter() - start < 2.0  # refused before the model is loaded
    assert not (tmp_path / "s.png").exists()
    TRIED["bad numeric options"] += 1


def test_a_sheet_too_large_in_all_is_refused_before_the_search(hostile, tmp_path):
    corpus, ix, _, _ = hostile
    queries = corpus.good * 200
    result = run_dtop("search", "--index", ix, *queries, "--sheet", tmp_path / "s.png", "--thumb", "1024",
                      "--topk", "50", *RUN)
    assert result.code == 2 and "megapixels" in result.err and "--thumb" in result.err
    TRIED["bad numeric options"] += 1


@pytest.mark.slow
def test_query_folder_reports_what_its_listing_skipped(hostile):
    corpus, ix, _, _ = hostile
    result = run_dtop("search", "--index", ix, corpus.root, "--topk", "1", *RUN)
    assert result.code == 0, result.err
    assert "skipped while listing" in result.out and "fifo.jpg: not a regular file" in result.out
    assert "(unreadable: " in result.out  # the corrupt files of the folder
    TRIED["query inputs"] += sum(1 for _ in Path(corpus.root).iterdir())
