"""Tests of data.py (datasets, eval transform, features, k-NN). Run: python -m pytest -q tests/test_data.py"""
import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import augment
import data


def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_from_idx_folder(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", [7, 0, 9])
    ds = data.build_dataset(str(tmp_path), train=True)
    assert isinstance(ds, data.FashionMNIST) and len(ds) == 3
    assert ds.images.dtype == np.uint8 and ds.images.shape == (3, 28, 28)
    img, label = ds[2]
    assert img.shape == (3, 28, 28) and img.dtype == torch.float32 and label == 9
    assert torch.equal(img[0], img[2]) and torch.allclose(img[0] * 255, torch.from_numpy(images[2]).float())


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.FashionMNIST(str(tmp_path))


def test_real_fashion_mnist(fashion_mnist_dir):
    ds = data.FashionMNIST(str(fashion_mnist_dir), train=False)
    assert len(ds) == 10000 and ds.labels.dtype == np.int64 and len(ds.classes) == 10
    img, label = ds[0]
    assert img.shape == (3, 28, 28) and 0 <= img.min() and img.max() <= 1 and label == 9  # first test item: boot


def test_image_folder_classes_and_corrupt_skip(tmp_path):
    from PIL import Image
    for cls, color in (("cat", 10), ("dog", 200)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        Image.new("RGB", (20, 10), (color, 0, 0)).save(tmp_path / cls / "a.png")
        Image.new("L", (8, 8), color).save(tmp_path / cls / "sub" / "b.jpg")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (5, 5)).save(tmp_path / "loose.png")
    ds = data.ImageFolder(str(tmp_path))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    assert sorted(ds.labels.tolist()) == [-1, 0, 0, 1, 1, 1]
    img, label = ds[ds.paths.index(str(tmp_path / "cat" / "a.png"))]
    assert img.shape == (3, 10, 20) and label == 0 and abs(img[0].mean().item() - 10 / 255) < 1e-6
    broken = ds.paths.index(str(tmp_path / "dog" / "broken.jpg"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        img, label = ds[broken]  # replaced by the next readable image
        loader = torch.utils.data.DataLoader(data.MapDataset(ds, lambda x: x.mean()), batch_size=6, num_workers=1)
        next(iter(loader))
    assert img.shape[0] == 3 and ds.n_corrupt == 2  # one in this process, one counted in the worker


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.build_dataset(str(tmp_path / "nope"))


def test_eval_transform_sizes_and_normalisation():
    small = torch.full((3, 28, 28), 0.5)
    out = data.eval_transform(small, 28)
    assert out.shape == (3, 28, 28)
    assert torch.allclose(out[:, 0, 0], (0.5 - torch.tensor(augment.IMAGENET_MEAN)) / torch.tensor(augment.IMAGENET_STD))
    assert data.eval_transform(small, 42).shape == (3, 42, 42)
    big = torch.rand(3, 300, 400)
    assert data.eval_transform(big, 224).shape == (3, 224, 224)  # shorter side 256, then centre crop


def test_knn_classify_hand_computed():
    # Two training points per class on the unit circle; the test point sits nearer to class 1.
    train_feats = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    train_labels = torch.tensor([0, 0, 1, 1])
    test_feats = F.normalize(torch.tensor([[0.3, 1.0], [1.0, 0.2]]), dim=1)
    res = data.knn_classify(train_feats, train_labels, test_feats, torch.tensor([1, 1]), ks=(1, 4))
    assert res[1]["top1"] == 50.0 and res[4]["top1"] == 50.0 and res[4]["top5"] == 100.0


def test_extract_features_normalised(fashion_mnist_dir):
    ds = data.FashionMNIST(str(fashion_mnist_dir), train=False)
    ds.images, ds.labels = ds.images[:10], ds.labels[:10]
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, 16))
    feats, labels = data.extract_features(backbone, ds, 28, batch_size=4)
    assert feats.shape == (10, 16) and feats.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.allclose(feats.norm(dim=1), torch.ones(10), atol=1e-5) and labels.tolist() == ds.labels.tolist()
