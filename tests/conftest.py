"""Shared pytest set-up: the repo root on sys.path, fixture paths, and skips for slow/GPU tests.

Run the suite with `python -m pytest -q` from the repository root; `RUN_SLOW=1` adds the slow tests.
"""
import gzip
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The reference tensors made with the official code live beside the checkout (../shared/fixtures).
FIXTURES = ROOT.parent / "shared" / "fixtures"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Two cores: keep torch from oversubscribing when pytest and DataLoader workers run together.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("RUN_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow on 2 CPU cores; set RUN_SLOW=1 to run"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (they sit in ../shared/fixtures)")
    return FIXTURES


@pytest.fixture
def fashion_mnist_dir():
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    return FASHION_MNIST


def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes())


@pytest.fixture
def idx_data(tmp_path):
    """A 64-image train / 32-image test set in Fashion-MNIST's IDX format, with a learnable class signal."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 32)):
        labels = np.arange(n) % 4
        images = rng.integers(0, 60, (n, 28, 28)) + (labels[:, None, None] * 50)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, launcher=(sys.executable,)):
    """A script of the repository run as a user runs it -> subprocess.CompletedProcess (text output)."""
    return subprocess.run([*launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def torchrun(n=2):
    """The launcher `torchrun --standalone --nproc_per_node=n` (standalone: it picks a free port itself)."""
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}")
