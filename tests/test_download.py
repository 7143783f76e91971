"""Downloads against a local HTTP server on 127.0.0.1 (never the real hosts).

The server is written here: it serves in-memory files, honours ``Range`` (unless told to ignore
it), can drop the connection part-way through a response, and logs every request.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import pickle
import tarfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from dtop.cli.main import main as cli_main
from dtop.data import download as dl
from dtop.data.download import (
    BASE_URL_ENV,
    CATALOGUE,
    MARKER_NAME,
    ChecksumError,
    DatasetSource,
    DownloadError,
    Resource,
    download_dataset,
    extract_archive,
    fetch,
    fetching,
    resource_url,
)
from dtop.data.gnd import load_gnd
from dtop.data.revisited import RevisitedDataset

REAL = Path("/work/shared/data/revisitop")
needs_real = pytest.mark.skipif(not (REAL / "gnd_roxford5k.pkl").is_file(), reason="real gnd files missing")


@dataclass
class Behaviour:
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: set[str] = field(default_factory=set)
    cut: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes to send before dropping, per request
    fail: dict[str, list[int]] = field(default_factory=dict)  # path -> HTTP status to answer, per request
    log: list[tuple[str, str | None]] = field(default_factory=list)


class Server:
    def __init__(self) -> None:
        self.b = Behaviour()
        behaviour = self.b

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                path = self.path
                rng = self.headers.get("Range")
                behaviour.log.append((path, rng))
                if behaviour.fail.get(path):
                    self.send_error(behaviour.fail[path].pop(0))
                    return
                data = behaviour.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and path not in behaviour.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cuts = behaviour.cut.get(path)
                if cuts:
                    n = cuts.pop(0)
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def _payload(n: int = 300_000) -> bytes:
    return hashlib.sha256(b"seed").digest() * (n // 32)


FAST = dict(backoff=0.0, progress=False, timeout=10)

# ------------------------------------------------------------------------------------- fetch


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    data = _payload()
    server.b.files["/f.bin"] = data
    server.b.cut["/f.bin"] = [100_000, 50_000]  # two drops, then the rest
    out = fetch(server.url + "/f.bin", tmp_path / "f.bin", md5=hashlib.md5(data).hexdigest(), **FAST)
    assert out.read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists()
    assert [r for _, r in server.b.log] == [None, "bytes=100000-", "bytes=150000-"]


def test_part_file_of_a_killed_run_is_continued(server, tmp_path):
    data = _payload()
    server.b.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:123_456])
    fetch(server.url + "/f.bin", tmp_path / "f.bin", md5=hashlib.md5(data).hexdigest(), **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.b.log == [("/f.bin", "bytes=123456-")]


def test_complete_part_file_gets_416_and_is_accepted(server, tmp_path):
    data = _payload(10_000)
    server.b.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)
    fetch(server.url + "/f.bin", tmp_path / "f.bin", md5=hashlib.md5(data).hexdigest(), **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = _payload()
    server.b.files["/f.bin"] = data
    server.b.ignore_range.add("/f.bin")
    (tmp_path / "f.bin.part").write_bytes(b"garbage that must not survive" * 100)
    fetch(server.url + "/f.bin", tmp_path / "f.bin", md5=hashlib.md5(data).hexdigest(), **FAST)
    assert (tmp_path / "f.bin").read_bytes() == data
    # ... and a drop mid-way is still recovered (by downloading from the start again).
    server.b.cut["/f.bin"] = [77_000]
    fetch(server.url + "/f.bin", tmp_path / "g.bin", **FAST)
    assert (tmp_path / "g.bin").read_bytes() == data


def test_checksum_mismatch_is_reported_and_not_kept(server, tmp_path):
    server.b.files["/f.bin"] = _payload()
    with pytest.raises(ChecksumError, match="md5 mismatch") as info:
        fetch(server.url + "/f.bin", tmp_path / "f.bin", md5="0" * 32, **FAST)
    assert "expected " + "0" * 32 in str(info.value)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_http_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(server.url + "/missing.bin", tmp_path / "m.bin", **FAST)
    assert "/missing.bin" in str(info.value)
    server.b.files["/f.bin"] = b"abc"
    server.b.fail["/f.bin"] = [503]
    fetch(server.url + "/f.bin", tmp_path / "f.bin", **FAST)  # a 5xx is retried
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    server.b.cut["/g.bin"] = [10] * 10
    server.b.files["/g.bin"] = _payload(1000)
    with pytest.raises(DownloadError, match="interrupted"):
        fetch(server.url + "/g.bin", tmp_path / "g.bin", retries=2, **FAST)
    assert (tmp_path / "g.bin.part").exists() and not (tmp_path / "g.bin").exists()  # kept to resume


def test_base_url_resolution(monkeypatch):
    src = CATALOGUE["rparis6k"]
    res = src.archives[0]
    monkeypatch.delenv(BASE_URL_ENV, raising=False)
    assert resource_url(src, res) == res.url
    assert resource_url(src, res, "http://127.0.0.1:9/m/") == "http://127.0.0.1:9/m/rparis6k/paris_1-v1.tgz"
    monkeypatch.setenv(BASE_URL_ENV, "http://127.0.0.1:8/x")
    assert resource_url(src, res) == "http://127.0.0.1:8/x/rparis6k/paris_1-v1.tgz"
    with pytest.raises(DownloadError):
        resource_url(src, res, "ftp://nope")


def test_catalogue_is_complete():
    assert set(CATALOGUE) == {"roxford5k", "rparis6k", "revisitop1m", "sfm120k", "gldv2-clean"}
    r1m = CATALOGUE["revisitop1m"]
    assert len(r1m.archives) == 100 and r1m.archives[-1].filename == "revisitop1m.100.tar.gz"
    assert r1m.resource("list").url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/revisitop1m.txt"
    if (REAL / "gnd_roxford5k.pkl").is_file():
        for name in ("roxford5k", "rparis6k"):
            gnd = CATALOGUE[name].resource("gnd")
            assert hashlib.md5((REAL / gnd.filename).read_bytes()).hexdigest() == gnd.md5


# ------------------------------------------------------------------------------------- archives


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(members: dict[str, bytes], gz: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w", **({"compresslevel": 1} if gz else {})) as tar:
        dirs = set()
        for name, data in members.items():
            parent = name.rsplit("/", 1)[0] if "/" in name else None
            if parent and parent not in dirs:
                ti = tarfile.TarInfo(parent)
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
                dirs.add(parent)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def test_extract_flattens_and_skips_unlisted(tmp_path):
    archive = tmp_path / "a.tgz"
    archive.write_bytes(
        _tar({"paris/louvre/p_1.jpg": b"1", "paris/eiffel/p_2.jpg": b"22", "paris/general/x.jpg": b"3"})
    )
    written, skipped = extract_archive(archive, tmp_path / "jpg", {"p_1.jpg", "p_2.jpg"}, progress=False)
    assert (written, skipped) == (2, 1)
    assert sorted(p.name for p in (tmp_path / "jpg").iterdir()) == ["p_1.jpg", "p_2.jpg"]
    assert (tmp_path / "jpg" / "p_2.jpg").read_bytes() == b"22"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz", "jpg"]  # no .download/ left beside it


def test_complete_download_leaves_no_download_folder(server, tmp_path):
    """The published md5 file of the ground truth used to keep `.download/` alive after completion."""
    names = [f"img_{i:03d}" for i in range(4)]
    src = _mini_source(server, names, n_archives=1)
    gnd = server.b.files["/mini/gnd_mini.pkl"]
    server.b.files["/mini/gnd_mini.pkl.md5"] = f"{hashlib.md5(gnd).hexdigest()}  gnd_mini.pkl\n".encode()
    index = dataclasses.replace(src.resources[0], md5_url="http://invalid.example/gnd_mini.pkl.md5")
    src = dataclasses.replace(src, resources=(index, *src.resources[1:]))
    download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert (tmp_path / "mini" / MARKER_NAME).is_file()
    assert not (tmp_path / "mini" / ".download").exists()


def test_extract_detects_truncated_archive(tmp_path):
    data = _tar({f"d/{i}.jpg": _payload(5000) for i in range(20)})
    for cut in (len(data) // 2, len(data) - 6):  # mid-stream, and only the gzip trailer (CRC) missing
        archive = tmp_path / "t.tgz"
        archive.write_bytes(data[:cut])
        with pytest.raises(DownloadError, match="corrupt or truncated"):
            extract_archive(archive, tmp_path / "jpg", {f"{i}.jpg" for i in range(20)}, progress=False)
    bad = bytearray(data)
    bad[-8] ^= 0xFF  # wrong CRC
    (tmp_path / "c.tgz").write_bytes(bytes(bad))
    with pytest.raises(DownloadError, match="corrupt or truncated"):
        extract_archive(tmp_path / "c.tgz", tmp_path / "jpg", set(), progress=False)
    assert gzip.decompress(data)  # the intact archive is fine


# ------------------------------------------------------------------------------------- datasets


def _mini_source(server: Server, names: list[str], n_archives: int = 2, nested: bool = False) -> DatasetSource:
    """A small dataset with a gnd, served by ``server`` under /mini/."""
    jpeg = _jpeg()
    db, q = names[:-1], names[-1:]
    gnd = {"imlist": db, "qimlist": q, "gnd": [{"bbx": [0, 0, 4, 4], "easy": [0], "hard": [], "junk": []}]}
    server.b.files["/mini/gnd_mini.pkl"] = pickle.dumps(gnd, protocol=3)
    chunks = [names[i::n_archives] for i in range(n_archives)]
    resources = [Resource("gnd_mini.pkl", "http://invalid.example/gnd_mini.pkl", "gnd")]
    for k, chunk in enumerate(chunks):
        prefix = f"top{k}/sub/" if nested else ""
        server.b.files[f"/mini/part{k}.tgz"] = _tar({f"{prefix}{n}.jpg": jpeg for n in chunk})
        resources.append(Resource(f"part{k}.tgz", f"http://invalid.example/part{k}.tgz", "archive"))
    return DatasetSource("mini", tuple(resources), expected_images=len(names))


def test_dataset_download_is_idempotent_and_resumes_between_archives(server, tmp_path, caplog):
    names = [f"img_{i:03d}" for i in range(12)]
    src = _mini_source(server, names, n_archives=3, nested=True)
    server.b.fail["/mini/part1.tgz"] = [404]
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert not (tmp_path / "mini" / MARKER_NAME).exists()
    state = json.loads((tmp_path / "mini" / ".download" / "state.json").read_text())
    assert state == {"extracted": ["part0.tgz"]}
    server.b.log.clear()
    report = download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert [p for p, _ in server.b.log] == ["/mini/part1.tgz", "/mini/part2.tgz"]  # part0 not fetched again
    assert report.n_images == 12 and not report.already_complete
    jpg = tmp_path / "mini" / "jpg"
    assert sorted(p.name for p in jpg.iterdir()) == [f"{n}.jpg" for n in names]  # flattened
    assert not (tmp_path / "mini" / ".download").exists()  # archives deleted, state cleaned
    ds = RevisitedDataset(None, tmp_path / "mini")
    assert ds.n_database == 11 and ds.query_dataset()[0][0].size == (4, 4)

    server.b.log.clear()
    with caplog.at_level(logging.INFO, logger="dtop"):
        again = download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert again.already_complete and server.b.log == []
    assert any("already complete" in m and "nothing to do" in m for m in caplog.messages)

    (jpg / "img_004.jpg").unlink()  # a lost image is fetched again
    report = download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert (jpg / "img_004.jpg").is_file() and not report.already_complete


def test_corrupt_archive_is_deleted_and_reported(server, tmp_path):
    names = [f"img_{i:03d}" for i in range(6)]
    src = _mini_source(server, names, n_archives=1)
    good = server.b.files["/mini/part0.tgz"]
    server.b.files["/mini/part0.tgz"] = good[: len(good) - 10]
    with pytest.raises(DownloadError, match="corrupt or truncated.*run the command again"):
        download_dataset(src, tmp_path, base_url=server.url, keep_archives=True, **FAST)
    assert not (tmp_path / "mini" / ".download" / "part0.tgz").exists()
    server.b.files["/mini/part0.tgz"] = good
    download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert (tmp_path / "mini" / MARKER_NAME).is_file()


def test_archive_missing_images_is_an_error(server, tmp_path):
    names = [f"img_{i:03d}" for i in range(6)]
    src = _mini_source(server, names, n_archives=1)
    server.b.files["/mini/part0.tgz"] = _tar({f"{n}.jpg": b"x" for n in names[:4]})
    with pytest.raises(DownloadError, match=r"2 of 6 images are missing.*img_004\.jpg, img_005\.jpg"):
        download_dataset(src, tmp_path, base_url=server.url, **FAST)
    assert not (tmp_path / "mini" / MARKER_NAME).exists()


def test_r1m_style_list_keeps_relative_paths(server, tmp_path):
    names = ["a/b/one.jpg", "a/c/two.jpg", "three.jpg", "d/four"]
    server.b.files["/r1m/list.txt"] = ("\n".join(names) + "\n").encode()
    server.b.files["/r1m/r.1.tar.gz"] = _tar({"a/b/one.jpg": b"1", "a/c/two.jpg": b"2"})
    server.b.files["/r1m/r.2.tar.gz"] = _tar({"jpg/three.jpg": b"3", "jpg/d/four.jpg": b"4"})
    src = DatasetSource(
        "r1m",
        (
            Resource("list.txt", "http://invalid.example/list.txt", "list"),
            Resource("r.1.tar.gz", "http://invalid.example/r.1.tar.gz", "archive"),
            Resource("r.2.tar.gz", "http://invalid.example/r.2.tar.gz", "archive"),
        ),
        expected_images=4,
    )
    download_dataset(src, tmp_path, base_url=server.url, **FAST)
    jpg = tmp_path / "r1m" / "jpg"
    assert (jpg / "a/b/one.jpg").read_bytes() == b"1" and (jpg / "d/four.jpg").read_bytes() == b"4"
    assert (jpg / "three.jpg").is_file()


@needs_real
def test_dtop_download_rparis6k_end_to_end(server, tmp_path, monkeypatch, capsys):
    """The real catalogue entry against a mirror: real gnd (md5-checked), sub-folder archives."""
    gnd_bytes = (REAL / "gnd_rparis6k.pkl").read_bytes()
    gt = load_gnd(REAL / "gnd_rparis6k.pkl")
    names = gt.imlist + gt.qimlist
    jpeg = _jpeg()
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    server.b.files["/rparis6k/gnd_rparis6k.pkl"] = gnd_bytes
    for k, part in enumerate(halves):
        members = {f"paris/{n.split('_')[1]}/{n}.jpg": jpeg for n in part}
        members[f"paris/general/paris_corrupt_{k}.jpg"] = b""  # not in the benchmark: skipped
        server.b.files[f"/rparis6k/paris_{k + 1}-v1.tgz"] = _tar(members)
    server.b.cut["/rparis6k/paris_1-v1.tgz"] = [50_000]  # one dropped connection on the way
    monkeypatch.setenv(BASE_URL_ENV, server.url)
    sleeps: list[float] = []
    monkeypatch.setattr(fetching.time, "sleep", sleeps.append)
    root = tmp_path / "data"
    assert cli_main(["download", "rparis6k", "--root", str(root), "--no-progress"]) == 0
    assert sleeps == [2.0]  # one retry after the dropped connection, with the default back-off
    jpg = root / "rparis6k" / "jpg"
    files = list(jpg.iterdir())
    assert len(files) == 6392 and all(p.is_file() for p in files)
    ds = RevisitedDataset(root, "rparis6k")
    assert (ds.n_queries, ds.n_database) == (70, 6322)
    assert (root / "rparis6k" / "gnd_rparis6k.pkl").read_bytes() == gnd_bytes
    capsys.readouterr()
    n_requests = len(server.b.log)
    assert cli_main(["download", "rparis6k", "--root", str(root), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().err and len(server.b.log) == n_requests


@needs_real
def test_real_gnd_checksum_mismatch(server, tmp_path, capsys):
    gnd = bytearray((REAL / "gnd_roxford5k.pkl").read_bytes())
    gnd[-20] ^= 1
    server.b.files["/roxford5k/gnd_roxford5k.pkl"] = bytes(gnd)
    rc = cli_main(["download", "roxford5k", "--root", str(tmp_path), "--base-url", server.url, "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "md5 mismatch" in err and "deleted" in err
    assert list((tmp_path / "roxford5k").iterdir()) == []


def test_unknown_dataset():
    with pytest.raises(Exception, match="unknown dataset"):
        dl.download_dataset("imagenet", "/tmp/nowhere")
