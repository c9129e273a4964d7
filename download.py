"""Fetching Fashion-MNIST, the CPU demo's data, when Debian's dataset-fashion-mnist package is not installed.

Standard library only. Each file is checked against its MD5 before it gets its final name, so a cut connection
or a wrong server never leaves a partial file behind; tests/test_download.py runs it against a loopback server.

Run: nothing to run; data.build_dataset("fashion-mnist") calls fashion_mnist_root.
"""
import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist package puts it


# The four files of the Zalando fashion-mnist README ("Get the Data"), with two MD5s each: the
# README's MD5 of the .gz as Zalando serves it, and the MD5 of the decompressed IDX file. Debian's
# dataset-fashion-mnist re-compressed the files (other gzip headers, so other .gz MD5s: f78720b4...
# for t10k-images), while the decompressed bytes are Zalando's (checked against
# /usr/share/datasets/fashion-mnist), so a file is accepted if either MD5 matches.
# Smallest first: a broken server is found within kilobytes.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # name: (MD5 of the .gz (README), MD5 of the decompressed IDX file)
    "t10k-labels-idx1-ubyte.gz":
        ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    "train-labels-idx1-ubyte.gz":
        ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte.gz":
        ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "train-images-idx3-ubyte.gz":
        ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
}


class DownloadError(RuntimeError):
    """Fashion-MNIST could not be fetched or did not verify; the message says what to do instead."""


def fashion_mnist_cache():
    """Where the download goes: $DINOV2_FASHION_MNIST, else
    $XDG_CACHE_HOME (default ~/.cache)/dinov2-flat/fashion-mnist."""
    if os.environ.get("DINOV2_FASHION_MNIST"):
        return os.environ["DINOV2_FASHION_MNIST"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dinov2-flat", "fashion-mnist")


def fashion_mnist_root():
    """The folder with the four IDX files for --data fashion-mnist: Debian's package if installed,
    else the cache, downloading into it what is missing."""
    if all(os.path.exists(os.path.join(FASHION_MNIST_DIR, name)) for name in FASHION_MNIST_FILES):
        return FASHION_MNIST_DIR
    cache = fashion_mnist_cache()
    if not all(os.path.exists(os.path.join(cache, name)) for name in FASHION_MNIST_FILES):
        print(f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (Debian's dataset-fashion-mnist) "
              f"nor in {cache}")
        download_fashion_mnist(cache)
    return cache


def download_fashion_mnist(folder, base_url=None, timeout=60):
    """Fetch the missing Fashion-MNIST files into `folder` from base_url (default
    $DINOV2_FASHION_MNIST_URL, else Zalando's FASHION_MNIST_URL). Each file is read whole, checked
    against its MD5 (either of FASHION_MNIST_FILES), written under a temporary name unique to this
    process and renamed, so the folder never holds a partial or unverified file, even with two runs
    downloading at once. Standard library only."""
    base_url = base_url or os.environ.get("DINOV2_FASHION_MNIST_URL") or FASHION_MNIST_URL
    missing = [n for n in FASHION_MNIST_FILES if not os.path.exists(os.path.join(folder, n))]
    if missing:
        print(f"downloading {len(missing)} Fashion-MNIST files (30 MB in all) from {base_url} "
              f"into {folder}", flush=True)
        os.makedirs(folder, exist_ok=True)
    for name in missing:
        url = base_url.rstrip("/") + "/" + name
        payload = _fetch(url, timeout)
        _verify(name, payload, url)
        path = os.path.join(folder, name)
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)  # atomic: the final name only ever holds a whole, verified file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"  {name}: {len(payload):,} bytes, MD5 verified", flush=True)


def _fetch(url, timeout):
    offline = (f"could not download {url}: %s. Without internet, either "
               f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts the files in "
               f"{FASHION_MNIST_DIR}), or copy the four files {', '.join(FASHION_MNIST_FILES)} "
               f"into a folder and pass --data <folder>")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()  # raises IncompleteRead when the body is shorter than announced
    except http.client.IncompleteRead as e:
        got, announced = len(e.partial), len(e.partial) + (e.expected or 0)
        reason = f"the connection closed after {got:,} of {announced:,} bytes"
        raise DownloadError(offline % reason) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(offline % (getattr(e, "reason", None) or e)) from None


def _verify(name, payload, url):
    gz_md5, idx_md5 = FASHION_MNIST_FILES[name]
    payload_md5 = hashlib.md5(payload).hexdigest()
    if payload_md5 == gz_md5:
        return
    try:
        content_md5 = hashlib.md5(gzip.decompress(payload)).hexdigest()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, cut short, or damaged
        content_md5 = f"none: not a complete gzip file ({e})"
    if content_md5 != idx_md5:
        raise DownloadError(
            f"{url} failed its checksum: MD5 {payload_md5} of {len(payload):,} bytes "
            f"(decompressed: {content_md5}); expected {gz_md5} (decompressed: {idx_md5}). Nothing "
            f"was written; try again, or use `apt-get install dataset-fashion-mnist` or "
            f"--data <folder>")
