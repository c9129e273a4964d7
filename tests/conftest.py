"""Shared pytest set-up: the repo root on sys.path, fixture paths, and skips for slow/GPU tests.

Run the suite with `python -m pytest -q` from the repository root; `RUN_SLOW=1` adds the slow tests.
"""
import os
import sys
from pathlib import Path

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
