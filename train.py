"""DINOv2 self-supervised pretraining (arXiv 2304.07193, Sec. 3-5, App. B) in one readable file.

Run:
    python train.py                       # the tiny CPU demo preset on Fashion-MNIST (work in progress)

Data section (imported by eval.py, curate.py and distill.py):
    FashionMNIST, ImageFolder, build_dataset    datasets (IDX files / a folder of images)
    eval_transform                              resize + centre crop + ImageNet normalisation
    extract_features, knn_classify              weighted k-NN monitor (DINO v1 eval_knn, k=20, T=0.07)

Shape legend: B batch, N tokens, D width, H heads, K prototypes, C classes.
"""
import gzip
import multiprocessing
import os
import struct
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------
# Data: datasets, evaluation transform, feature extraction and the k-NN monitor
# ---------------------------------------------------------------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist package puts it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _read_idx(path):
    """Read one IDX file (LeCun's MNIST format, optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    assert dtype_code == 0x08, f"{path}: only uint8 IDX files are supported"
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def _find_idx(root, name):
    for candidate in (name + ".gz", name):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.join(root, candidate)
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}(.gz) not found in {root}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (puts it in {FASHION_MNIST_DIR}) or pass --data <folder>.")


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files: item -> (float32 [3,28,28] in [0,1], grey repeated to 3 channels; label)."""
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def __init__(self, root=FASHION_MNIST_DIR, train=True):
        prefix = "train" if train else "t10k"
        self.images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))  # uint8 [N,28,28]
        self.labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)  # [N]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.from_numpy(self.images[i].astype(np.float32) / 255.0)  # [28,28]
        return img.unsqueeze(0).repeat(3, 1, 1), int(self.labels[i])  # [3,28,28]


class ImageFolder(Dataset):
    """All images under `root` (recursive). Class = first-level sub-folder (sorted); -1 for images at the top level.

    A corrupt or unreadable image is skipped (the next readable image is returned instead, with its own label),
    counted in `n_corrupt` (shared by DataLoader workers) and warned about once, so an epoch never crashes.
    """

    def __init__(self, root):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist (pass --data <folder of images> "
                                    f"or --data fashion-mnist)")
        self.root = root
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        class_index = {c: i for i, c in enumerate(self.classes)}
        self.paths, labels = [], []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            label = -1 if rel == "." else class_index.get(rel.split(os.sep)[0], -1)
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    self.paths.append(os.path.join(dirpath, name))
                    labels.append(label)
        if not self.paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}")
        self.labels = np.array(labels, dtype=np.int64)
        self._n_corrupt = multiprocessing.Value("i", 0)  # shared memory: counts from DataLoader workers add up

    @property
    def n_corrupt(self):
        return self._n_corrupt.value

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        from PIL import Image  # third party, only needed for image folders
        with Image.open(self.paths[i]) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # [H,W,3]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3,H,W]

    def __getitem__(self, i):
        for j in range(len(self)):
            k = (i + j) % len(self)
            try:
                return self.load(k), int(self.labels[k])
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
                with self._n_corrupt.get_lock():
                    self._n_corrupt.value += 1
                warnings.warn(f"skipping unreadable image {self.paths[k]}: {e}")
        raise RuntimeError(f"no readable image in {self.root}")


def build_dataset(data, train=True):
    """"fashion-mnist" or a folder holding its IDX files -> FashionMNIST; any other folder -> ImageFolder.

    For image folders with `train/` and `val/` (or `test/`) sub-folders (ImageNet layout) the split is picked.
    """
    if data == "fashion-mnist":
        return FashionMNIST(FASHION_MNIST_DIR, train=train)
    if os.path.isdir(data) and any(n.startswith("train-images-idx3-ubyte") for n in os.listdir(data)):
        return FashionMNIST(data, train=train)
    for split in (("train",) if train else ("val", "test")):
        if os.path.isdir(os.path.join(data, split)):
            return ImageFolder(os.path.join(data, split))
    return ImageFolder(data)


def normalize(img):
    """ImageNet mean/std normalisation of [..., 3, H, W] images in [0,1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - mean) / std


def resize(img, size):
    """Bicubic (antialiased) resize of [3,H,W] or [B,3,H,W] to size=(h, w), clamped back to [0,1]."""
    x = img if img.dim() == 4 else img.unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    return x if img.dim() == 4 else x[0]


def eval_transform(img, size):
    """[3,H,W] float in [0,1] -> [3,size,size] normalised. The usual ImageNet protocol (resize the shorter side to
    size/0.875, centre crop) except for small images (both sides <= size, e.g. Fashion-MNIST), resized directly."""
    h, w = img.shape[-2:]
    if h <= size and w <= size:
        return normalize(resize(img, (size, size)))
    short = int(round(size / 0.875))
    img = resize(img, (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short))
    h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return normalize(img[:, top:top + size, left:left + size])


class MapDataset(Dataset):
    """Apply `fn` to the image of each (image, label) item (inside DataLoader workers)."""

    def __init__(self, dataset, fn):
        self.dataset, self.fn = dataset, fn

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return self.fn(img), label


@torch.no_grad()
def extract_features(backbone, dataset, image_size, batch_size=256, device="cpu", num_workers=0):
    """-> (feats float32 [N,D] L2-normalised class tokens (x_norm_clstoken), labels int64 [N]) on the CPU."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(MapDataset(dataset, partial(eval_transform, size=image_size)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features", leave=False, disable=len(loader) < 2):
        f = backbone(x.to(device, non_blocking=True))  # [B,D]
        feats.append(F.normalize(f.float(), dim=-1).cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, test_labels, ks=(20,), temperature=0.07, chunk=1024):
    """Weighted k-NN (DINO v1 eval_knn): cosine similarity to every training feature, the k nearest vote for their
    class with weight softmax(sim / T). Features must be L2-normalised. -> {k: {"top1": %, "top5": %}}."""
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = {k: [0, 0] for k in ks}
    for i in range(0, len(test_feats), chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T  # [B,Ntrain]
        top_sim, top_idx = sim.topk(max(ks), dim=1)  # [B,kmax]
        top_labels = train_labels[top_idx]  # [B,kmax]
        target = test_labels[i:i + chunk]
        for k in ks:
            votes = torch.softmax(top_sim[:, :k] / temperature, dim=1)  # [B,k]
            scores = torch.zeros(len(target), n_classes).scatter_add_(1, top_labels[:, :k], votes)  # [B,C]
            pred = scores.topk(min(5, n_classes), dim=1).indices  # [B,5]
            correct[k][0] += (pred[:, 0] == target).sum().item()
            correct[k][1] += (pred == target[:, None]).any(dim=1).sum().item()
    n = len(test_feats)
    return {k: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n} for k, (c1, c5) in correct.items()}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def main():
    # Placeholder until the training loop lands: the raw-pixel k-NN baseline of the demo.
    train_set, test_set = build_dataset("fashion-mnist", True), build_dataset("fashion-mnist", False)
    raw = lambda ds: (F.normalize(torch.from_numpy(ds.images).float().flatten(1), dim=-1), torch.from_numpy(ds.labels))
    print("raw-pixel k-NN (k=20, T=0.07):", knn_classify(*raw(train_set), *raw(test_set)))


if __name__ == "__main__":
    main()
