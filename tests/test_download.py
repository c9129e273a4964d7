"""Tests for the Fashion-MNIST download (download.download_fashion_mnist) against a local HTTP server.

These machines have no internet, so a server on 127.0.0.1 (a free port, loopback only, stopped
after each test) serves the files of Debian's dataset-fashion-mnist package the way Zalando's server
would, and misbehaves on request: a changed byte, a body cut short, no server at all. The tests skip
without the package.

Run: python -m pytest -q tests/test_download.py   (a few seconds; one test moves the 30 MB once)
"""
import gzip
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

import data
import download

SMALL = "t10k-labels-idx1-ubyte.gz"  # 5 kB: the first file fetched, enough to see a failure


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /<name> -> the file's bytes; server.mode "corrupt" flips a byte, "truncated" announces
    the full length but closes after half of it (a dropped connection)."""

    def do_GET(self):
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.server.requests.append(self.path)
        if self.server.mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.server.mode == "truncated" else body)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def server(fashion_mnist_dir):
    """A loopback HTTP server with the Debian files; yields it with .url, .mode and .requests."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files = {n: (fashion_mnist_dir / n).read_bytes() for n in download.FASHION_MNIST_FILES}
    httpd.mode, httpd.requests = "ok", []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05),
                              daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_download_verifies_and_loads(server, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setattr(download, "FASHION_MNIST_DIR", str(tmp_path / "no-debian-package"))
    monkeypatch.setenv("DINOV2_FASHION_MNIST", str(cache))
    monkeypatch.setenv("DINOV2_FASHION_MNIST_URL", server.url)
    test_set = data.build_dataset("fashion-mnist", train=False)  # on a machine without the data
    assert len(test_set) == 10_000 and test_set[0][1] == 9  # the first test image is an ankle boot
    assert sorted(p.name for p in cache.iterdir()) == sorted(download.FASHION_MNIST_FILES)  # no temps
    for name in download.FASHION_MNIST_FILES:
        assert (cache / name).read_bytes() == server.files[name]
    out = capsys.readouterr().out
    assert f"downloading 4 Fashion-MNIST files (30 MB in all) from {server.url} into {cache}" in out
    assert out.count("MD5 verified") == 4
    assert len(server.requests) == 4
    assert len(data.build_dataset("fashion-mnist", train=True)) == 60_000
    assert len(server.requests) == 4  # the second time from the cache


def test_checksums_match_the_debian_files(fashion_mnist_dir):
    # the published .gz MD5s are Zalando's; Debian's re-compressed copies match decompressed
    for name, (_, idx_md5) in download.FASHION_MNIST_FILES.items():
        raw = gzip.decompress((fashion_mnist_dir / name).read_bytes())
        assert hashlib.md5(raw).hexdigest() == idx_md5


@pytest.mark.parametrize("mode, message", [
    ("corrupt", f"{SMALL} failed its checksum"),
    ("truncated", "the connection closed after 2,562 of 5,125 bytes"),
])
def test_a_bad_file_is_refused_and_nothing_is_written(server, tmp_path, mode, message):
    server.mode = mode
    with pytest.raises(download.DownloadError, match=message) as e:
        download.download_fashion_mnist(tmp_path / "cache", base_url=server.url, timeout=10)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)
    assert "--data <folder>" in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file, no temp file


def test_a_file_cut_short_with_a_matching_length_fails_its_checksum(server, tmp_path):
    server.files[SMALL] = server.files[SMALL][:3000]  # short, served whole: only the MD5 can tell
    with pytest.raises(download.DownloadError, match="not a complete gzip file"):
        download.download_fashion_mnist(tmp_path / "cache", base_url=server.url, timeout=10)
    assert not (tmp_path / "cache" / SMALL).exists()


def test_server_down_names_both_ways_out(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(download.DownloadError) as e:
        download.download_fashion_mnist(tmp_path / "cache", base_url=f"http://127.0.0.1:{port}/",
                                    timeout=5)
    message = str(e.value)
    assert message.startswith(f"could not download http://127.0.0.1:{port}/{SMALL}: ")
    assert "apt-get install dataset-fashion-mnist" in message and "pass --data <folder>" in message
    assert not any(Path(tmp_path / "cache").glob("*.gz"))
