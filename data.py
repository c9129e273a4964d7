"""Data for DINOv2: datasets, the training data stream, and the k-NN monitor (arXiv 2304.07193).

Everything here is shared by the later stages: train.py and distill.py draw their micro-batches from Batches
(augmented by augment.MultiCropCollate), eval.py and curate.py read images with build_dataset and embed them with
extract_features, and training is monitored with the same weighted k-NN (knn_classify) that eval.py reports.

Run:
    python data.py                  # a look at one training batch of the tiny preset: shapes, ranges, mask ratios

Paper -> code (the augmentation and the iBOT masks are in augment.py)
  Sec. 7 evaluation transform (resize, centre crop, normalise) ....... eval_transform
  DINO v1 weighted k-NN (k=20, T=0.07), used in Sec. 7 tables ........ extract_features, knn_classify, knn_eval
  Data order as a function of (seed, step, sample) ................... GlobalBatchSampler, shuffled, SeededItems,
                                                                        Batches (exact resume, any number of GPUs)

Datasets: Fashion-MNIST from its IDX files (Debian package dataset-fashion-mnist), or any folder of images
(recursive; class sub-folders used only for evaluation; unreadable images skipped and counted).

Shape legend: B batch, D width, C classes.
"""
import argparse
import contextlib
import gzip
import multiprocessing
import os
import struct
import warnings
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from download import FASHION_MNIST_DIR, fashion_mnist_root
from augment import MultiCropCollate, normalize, resize
from runtime import progress


# ---------------------------------------------------------------------------------------------------------------
# Data: datasets, evaluation transform, feature extraction and the k-NN monitor
# ---------------------------------------------------------------------------------------------------------------
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
        f"`apt-get install dataset-fashion-mnist` (puts it in {FASHION_MNIST_DIR}), pass "
        f"--data <folder> with the four IDX files, or --data fashion-mnist to download them.")


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
    """"fashion-mnist" (downloaded if needed: fashion_mnist_root) or a folder holding its IDX files ->
    FashionMNIST; any other folder -> ImageFolder.

    For image folders with `train/` and `val/` (or `test/`) sub-folders (ImageNet layout) the split is picked.
    """
    if data == "fashion-mnist":  # Debian's copy, else the cache, downloaded on first use
        return FashionMNIST(fashion_mnist_root(), train=train)
    if os.path.isdir(data) and any(n.startswith("train-images-idx3-ubyte") for n in os.listdir(data)):
        return FashionMNIST(data, train=train)
    for split in (("train",) if train else ("val", "test")):
        if os.path.isdir(os.path.join(data, split)):
            return ImageFolder(os.path.join(data, split))
    return ImageFolder(data)


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
def extract_features(backbone, dataset, image_size, batch_size=256, device="cpu", num_workers=0, all_ranks=False):
    """-> (feats float32 [N,D] L2-normalised class tokens (x_norm_clstoken), labels int64 [N]) on the CPU.
    all_ranks: under torchrun each rank embeds an equal share (the last one padded, so that FSDP2's collectives
    line up) and the shares are all-gathered: every rank gets what one process would."""
    was_training = backbone.training
    backbone.eval()
    n, world = len(dataset), dist.get_world_size() if all_ranks and dist.is_initialized() else 1
    share = -(-n // world)  # ceil
    if world > 1:  # rank r: items [r * share, (r + 1) * share), the last index repeated past the end
        first = dist.get_rank() * share
        dataset = Subset(dataset, [min(i, n - 1) for i in range(first, first + share)])
    loader = DataLoader(MapDataset(dataset, partial(eval_transform, size=image_size)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for x, y in progress(loader, desc="features", leave=False, disable=len(loader) < 2):
        f = backbone(x.to(device, non_blocking=True))  # [B,D]
        feats.append(F.normalize(f.float(), dim=-1))
        labels.append(y.to(f.device))
    backbone.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels).long()
    if world > 1:  # [share,D] per rank -> [world*share,D] in rank order, padding dropped
        feats, labels = (torch.cat(_all_gather(t))[:n] for t in (feats, labels))
    return feats.cpu(), labels.cpu()


def _all_gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def subset(dataset, n, seed=0):
    """A fixed random subset of n items (all when n is 0/None or at least the size), the same for every backbone
    evaluated on it (train.py's k-NN monitor, eval.py --n_train / --n_test)."""
    if not n or n >= len(dataset):
        return dataset
    return Subset(dataset, np.random.default_rng(seed).choice(len(dataset), n, replace=False))


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


def knn_eval(backbone, splits, image_size, device, autocast=None, train_size=None, num_workers=0):
    """Weighted k-NN top-1 (k=20, T=0.07, DINO v1 protocol) of `backbone` on splits = (train, held-out), in %.
    train_size: a fixed random subset of the training images (None: all). Under torchrun the ranks share the
    feature extraction (extract_features(all_ranks=True)), so every rank must call it."""
    train_set, test_set = subset(splits[0], train_size), splits[1]
    with autocast or contextlib.nullcontext():
        train = extract_features(backbone, train_set, image_size, device=device, num_workers=num_workers,
                                 all_ranks=True)
        test = extract_features(backbone, test_set, image_size, device=device, num_workers=num_workers,
                                all_ranks=True)
    return knn_classify(*train, *test, ks=(20,), temperature=0.07)[20]["top1"]


# ---------------------------------------------------------------------------------------------------------------
# The training data stream: a function of (seed, step, sample) on any number of GPUs
# ---------------------------------------------------------------------------------------------------------------
class SeededItems(Dataset):
    """Items keyed by (index, (step, position)) -> (image, label, (step, position)) for MultiCropCollate."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_key = key
        img, label = self.dataset[index]
        return img, label, sample_key


def _mix(x):
    """splitmix64's finaliser: a well-spread hash of uint64 values (wraps modulo 2^64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shuffled(positions, n, seed, epoch, rounds=6):
    """A pseudo-random permutation of [0, n) evaluated at `positions`, without materialising it: a balanced
    Feistel network over the smallest even number of bits that covers n (keys from (seed, epoch)), applied
    again to any value that lands at or above n (cycle walking keeps it a bijection of [0, n)). O(1) memory
    and O(len(positions)) time, whatever n: the order of a 142M-image epoch costs what a batch's costs.
    positions int [P] -> image indices int64 [P]."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = np.random.default_rng([seed, epoch, 3]).integers(0, 2 ** 63, rounds, dtype=np.uint64)
    x = np.asarray(positions, dtype=np.uint64)
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x[todo] >> shift, x[todo] & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        x[todo] = (left << shift) | right
        todo = x >= n
    return x.astype(np.int64)


class GlobalBatchSampler:
    """Infinite sampler of one rank's micro-batches, a pure function of (seed, step), so resuming needs no state
    and any number of GPUs sees the same data: epoch e orders the data by a permutation keyed by (seed, e)
    (`shuffled`, computed only where it is read); step t of that epoch takes the next `global_batch` images,
    and micro-batch a of rank r (accumulation index a) takes positions [(a * world + r) * micro, ... + micro)
    of them: forward pass a of all ranks together sees one contiguous slice, the same slice for any split of it
    into ranks. Yields [(index, (step, position))]."""

    def __init__(self, n, global_batch, micro_batch, seed, rank=0, world_size=1, start_step=0):
        assert global_batch % (micro_batch * world_size) == 0, (global_batch, micro_batch, world_size)
        self.n, self.global_batch, self.micro, self.seed = n, global_batch, micro_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.accum = global_batch // (micro_batch * world_size)
        self.steps_per_epoch = n // global_batch  # drop the last incomplete global batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} images cannot fill one global batch of {global_batch}: lower --batch_size")

    def micro_batches(self, step):
        """The rank's micro-batches of `step` -> [[(index, (step, position))] for each accumulation step]."""
        epoch, i = divmod(step, self.steps_per_epoch)
        out = []
        for a in range(self.accum):
            first = (a * self.world_size + self.rank) * self.micro  # position in the global batch
            positions = np.arange(first, first + self.micro)
            images = shuffled(i * self.global_batch + positions, self.n, self.seed, epoch)
            out.append([(int(index), (step, int(j))) for index, j in zip(images, positions)])
        return out

    def __iter__(self):
        step = self.start_step
        while True:
            yield from self.micro_batches(step)
            step += 1


class Batches:
    """The micro-batches of step `it` for this rank (a function of (seed, it, sample), GlobalBatchSampler),
    augmented in DataLoader workers; the loader is rebuilt when the global crop size changes (start, resume,
    entering the high-resolution phase). prepare(batch) adapts a batch (distill.py: no masks, Sec. 5)."""

    def __init__(self, dataset, cfg, run, prepare=None):
        self.dataset, self.cfg, self.run, self.loader, self.size = dataset, cfg, run, None, None
        self.prepare = prepare or (lambda batch: batch)

    def at(self, it, size):
        cfg, run = self.cfg, self.run
        if size != self.size:
            self.size = size
            collate = MultiCropCollate(size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size,
                                       global_scale=cfg.global_crop_scale, local_scale=cfg.local_crop_scale,
                                       mask_ratio=cfg.mask_ratio, mask_probability=cfg.mask_probability,
                                       blur_sigma=cfg.blur_sigma, seed=cfg.seed, global_batch=cfg.batch_size)
            sampler = GlobalBatchSampler(len(self.dataset), cfg.batch_size, run.micro_batch_size, cfg.seed,
                                         run.rank, run.world_size, start_step=it)
            self.loader = iter(DataLoader(SeededItems(self.dataset), batch_sampler=sampler, collate_fn=collate,
                                          num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
                                          prefetch_factor=4 if cfg.num_workers else None))
        to_device = lambda batch: {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        return [self.prepare(to_device(next(self.loader))) for _ in range(run.accumulation_steps)]


def labelled_splits(data):
    """(train, held-out) datasets when `data` has labels and a held-out split (Fashion-MNIST's test set, or the
    val/ or test/ folder of an image folder with class sub-folders), else None."""
    train_set, test_set = build_dataset(data, train=True), build_dataset(data, train=False)
    if isinstance(test_set, ImageFolder) and (test_set.root == train_set.root or (test_set.labels < 0).any()):
        return None
    return train_set, test_set


# ---------------------------------------------------------------------------------------------------------------
# A look at one batch
# ---------------------------------------------------------------------------------------------------------------
def main():
    """Print the shapes, value ranges and mask ratios of one tiny-preset training batch of Fashion-MNIST."""
    argparse.ArgumentParser(description=main.__doc__).parse_args()  # no flags; --help says what it does
    dataset = build_dataset("fashion-mnist")
    collate = MultiCropCollate(global_size=28, local_size=14, n_local=4, patch_size=7)
    batch = collate([(*dataset[i], (0, i)) for i in range(16)])  # step 0, positions 0..15
    for name, value in batch.items():
        print(f"{name:13s} {str(tuple(value.shape)):18s} {value.dtype}  min {value.min().item():.3f}  "
              f"max {value.max().item():.3f}")
    print("masked fraction per global crop:", [round(r, 2) for r in batch["masks"].float().mean(1).tolist()])


if __name__ == "__main__":
    main()
