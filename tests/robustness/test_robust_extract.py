"""`dtop extract --skip-bad` on a hostile corpus, and the extraction's own checks (defects 1, 3, 6)."""

from __future__ import annotations

import pytest
import torch

import dtop.engine.extract as extract_module
from dtop.engine.extract import extract_to_store, extract_with_failures
from dtop.engine.settings import MAX_INPUT_SIDE, ExtractSettings
from dtop.errors import ConfigError, DataError
from dtop.retrieval.store import DescriptorStore

from .hostile import OPTS, TRIED, make_corpus, run_dtop

SETTINGS = ExtractSettings(image_size=32, scales=[1.0])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):  # type: ignore[no-untyped-def]
    corpus = make_corpus(tmp_path_factory.mktemp("x") / "photos", n_good=2, broken=6)
    TRIED["corpus entries (extract)"] += corpus.size
    return corpus


def test_extract_skip_bad_on_a_hostile_corpus(small_corpus, tmp_path):
    corpus = small_corpus
    result = run_dtop("extract", "--images", corpus.root, "--model", "dtop_tiny", "--out", tmp_path / "s",
                      "--skip-bad", *OPTS)
    assert result.code == 0, result.err
    store = DescriptorStore.open(tmp_path / "s")
    _, valid = store.load()
    images = store.images
    good = {str(p) for p in corpus.good}
    assert {images[i] for i in range(len(images)) if valid[i]} == good
    assert {f.path for f in store.failures()} == {str(p) for p in corpus.bad}
    assert "skipped while listing" in result.out and "unreadable, left out:" in result.out
    assert all(line.isprintable() for line in result.out.splitlines())


def test_extract_without_skip_bad_names_the_files_in_one_line(small_corpus, tmp_path):
    result = run_dtop("extract", "--images", small_corpus.root, "--model", "dtop_tiny", "--out", tmp_path / "s",
                      *OPTS)
    assert result.code == 2 and len(result.error_lines) == 1
    assert "could not be read" in result.err and "--skip-bad" in result.err


def test_fifo_in_an_images_list_never_blocks(small_corpus, tmp_path):
    """Defect 6 as reported: a FIFO named in an `--images` list file hung extraction forever (its size
    was read before the regular-file check)."""
    import os
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{small_corpus.good[0]}\n{fifo}\n")
    out: dict = {}  # type: ignore[type-arg]
    argv = ["extract", "--images", listing, "--model", "dtop_tiny", "--out", tmp_path / "s", "--skip-bad", *OPTS]
    thread = threading.Thread(target=lambda: out.update(result=run_dtop(*argv)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "blocked on the FIFO"
    assert out["result"].code == 0, out["result"].err
    failures = DescriptorStore.open(tmp_path / "s").failures()
    assert [f.path for f in failures] == [str(fifo)] and "not a regular file" in failures[0].reason
    TRIED["non-regular files"] += 1


@pytest.mark.parametrize("kwargs", [{"batch_size": -3}, {"batch_size": 0}, {"num_workers": -1},
                                    {"shard_size": 0}, {"batch_size": 10**9}])
def test_extract_to_store_checks_its_options_before_any_work(tiny_model, tmp_path, kwargs):
    """Defect 3: a negative batch size planned no batch and the store was committed without images."""
    with pytest.raises(ConfigError, match="must be an integer from"):
        extract_to_store(tiny_model, ["a.jpg"], tmp_path / "s", settings=SETTINGS, **kwargs)
    assert not (tmp_path / "s").exists()
    TRIED["bad numeric options"] += 1


def test_an_extraction_that_leaves_a_shard_unwritten_fails(small_corpus, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "plan_batches", lambda shapes, batch_size: [])
    with pytest.raises(DataError, match="unwritten"):
        extract_to_store(tiny_model, small_corpus.good, tmp_path / "s", settings=SETTINGS, num_workers=0,
                         skip_bad=True, progress=False)
    assert not DescriptorStore.open(tmp_path / "s").is_complete()


def test_image_size_is_bounded_in_the_settings():
    """Defect 9: `--image-size 100000` grew until the process was killed; now refused when the settings are made."""
    with pytest.raises(ConfigError, match=f"the largest is {MAX_INPUT_SIDE}"):
        ExtractSettings(image_size=100000)
    with pytest.raises(ConfigError, match="largest"):
        ExtractSettings(image_size=1024, scales=[1.0, 64.0])
    from dtop.data.images import MAX_SIDE

    assert MAX_SIDE == MAX_INPUT_SIDE


def test_extract_with_failures_names_every_unreadable_image(small_corpus, tiny_model):
    corpus = small_corpus
    paths = [*corpus.good, *corpus.bad, *corpus.odd]
    desc, failures = extract_with_failures(tiny_model, paths, settings=SETTINGS)
    assert [f.index for f in failures] == list(range(len(corpus.good), len(paths)))
    assert all(f.reason for f in failures)
    assert torch.all(desc[len(corpus.good):] == 0) and torch.all(desc[: len(corpus.good)].norm(dim=1) > 0.99)


@pytest.mark.slow
def test_worker_processes_survive_hostile_files(small_corpus, tmp_path):
    """The same run with DataLoader worker processes: a decoding exception stays in its worker's item."""
    result = run_dtop("extract", "--images", small_corpus.root, "--model", "dtop_tiny", "--out", tmp_path / "s",
                      "--skip-bad", *OPTS, "--workers", "2")
    assert result.code == 0, result.err
    assert len(DescriptorStore.open(tmp_path / "s").failures()) == len(small_corpus.bad)
