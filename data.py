"""Data for DINOv2: datasets, multi-crop augmentation, iBOT block masks, and the k-NN monitor (arXiv 2304.07193).

Everything here is shared by the later stages: train.py and distill.py build their batches with MultiCropCollate,
eval.py and curate.py read images with build_dataset and embed them with extract_features, and training is
monitored with the same weighted k-NN (knn_classify) that eval.py reports.

Run:
    python data.py                  # a look at one training batch of the tiny preset: shapes, ranges, mask ratios

Paper -> code
  Sec. 4 / App. B multi-crop augmentation (2 global, 8 local crops) .. MultiCropCollate, augment_crops
  App. B colour jitter, grayscale, blur, solarisation ................ color_jitter, random_grayscale,
                                                                        gaussian_blur, solarize
  Sec. 4 patch-level objective (iBOT): block masking ................. block_mask, mask_plan, sample_masks
  Sec. 7 evaluation transform (resize, centre crop, normalise) ....... eval_transform
  DINO v1 weighted k-NN (k=20, T=0.07), used in Sec. 7 tables ........ extract_features, knn_classify
  Data order and augmentation as functions of (seed, step, sample) ... GlobalBatchSampler, SeededItems, Draws
                                                                        (exact resume, any number of GPUs)

Datasets: Fashion-MNIST from its IDX files (Debian package dataset-fashion-mnist), or any folder of images
(recursive; class sub-folders used only for evaluation; unreadable images skipped and counted).

Shape legend: B batch, N patches per crop, C classes, G / L global / local crop size in pixels.
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
from losses import ibot_mask_weights
from runtime import progress


# ---------------------------------------------------------------------------------------------------------------
# Data: datasets, evaluation transform, feature extraction and the k-NN monitor
# ---------------------------------------------------------------------------------------------------------------
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
# Multi-crop augmentation (Sec. 4 and App. B; DINO v1 Sec. 3.1) and iBOT block masking, batched in torch
# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline runs in the DataLoader's collate function on a batch of images, so it runs in the worker
# processes (num_workers > 0) or in the main process (num_workers = 0) with one code path. Only the random
# resized crop is per image (images of a folder differ in size); every colour op is one tensor op on the batch.
# Randomness is per sample: sample j of the global batch of step t draws its numbers from a generator seeded by
# (seed, t, j), whatever rank, micro-batch or worker it lands in. So 1 GPU with accumulation, 2 GPUs and 8 GPUs
# train on the same crops, and resuming on another number of GPUs continues the same stream.
# The uniform numbers one crop of one image draws, by operation, in a fixed order. They are drawn slot-major
# ([sum of the widths, crops] per sample), so a new augmentation added at the end of this table gets new numbers
# and every existing draw stays the same; and no draw depends on what an earlier operation decided.
CROP_DRAWS = {"box": 22, "flip": 1, "jitter": 9, "gray": 1, "blur": 2, "solarize": 1}
DRAWS_PER_CROP = sum(CROP_DRAWS.values())


class Draws:
    """Per-image uniform numbers of one crop, handed out by operation: u [B, DRAWS_PER_CROP] -> take(op) [B, k]."""

    def __init__(self, u):
        self.u = torch.as_tensor(u, dtype=torch.float64)
        ends = np.cumsum(list(CROP_DRAWS.values()))
        self.columns = {op: slice(end - k, end) for (op, k), end in zip(CROP_DRAWS.items(), ends)}

    def take(self, op):
        return self.u[:, self.columns[op]]


def sample_crop_boxes(u, heights, widths, scale, ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop.get_params for B images at once, from u [B, 2 * attempts + 2] uniforms
    -> int arrays top, left, h, w [B]."""
    u = u.numpy().T  # [2 * attempts + 2, B]
    B = len(heights)
    area = heights * widths * (scale[0] + (scale[1] - scale[0]) * u[:attempts])  # [attempts,B]
    log_ratio = np.log(ratio)
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[attempts:2 * attempts])
    w, h = np.round(np.sqrt(area * aspect)).astype(int), np.round(np.sqrt(area / aspect)).astype(int)
    ok = (w > 0) & (h > 0) & (w <= widths) & (h <= heights)
    first = ok.argmax(axis=0)  # first valid attempt per image
    h, w = h[first, np.arange(B)], w[first, np.arange(B)]
    fallback = ~ok.any(axis=0)  # torchvision falls back to the whole image, aspect ratio clamped
    side = np.minimum(heights, widths)
    h = np.where(fallback, np.where(heights / widths > ratio[1], side, heights), h)
    w = np.where(fallback, np.where(widths / heights > ratio[1], side, widths), w)
    top = (u[-2] * (heights - h + 1)).astype(int)
    left = (u[-1] * (widths - w + 1)).astype(int)
    return top, left, h, w


def gray(x):
    """ITU-R 601 luma of [B,3,H,W] -> [B,1,H,W] (torchvision rgb_to_grayscale)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_hue(x, shift):
    """Rotate the hue of [B,3,H,W] by shift [B] (fraction of a turn): RGB -> HSV -> RGB as torchvision does."""
    maxc, minc = x.max(dim=1).values, x.min(dim=1).values  # [B,H,W]
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = ((maxc.unsqueeze(1) - x) / safe.unsqueeze(1)).unbind(1)
    hue = torch.where(maxc == x[:, 0], b - g, torch.where(maxc == x[:, 1], 2.0 + r - b, 4.0 + g - r))
    hue = torch.where(delta > 0, hue / 6.0 % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1) + hue.unsqueeze(1) * 6.0) % 6.0  # [B,3,H,W]
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))


def color_jitter(x, u, p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8) (App. B) from u [B, 9]: each image gets its own
    factors and its own random order of the four operations, as torchvision draws them per image."""
    u = u.float()
    lows, highs = torch.tensor([1 - brightness, 1 - contrast, 1 - saturation, -hue]), \
        torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
    factors = (lows + (highs - lows) * u[:, :4]).T  # [4,B]: brightness, contrast, saturation, hue
    order = torch.argsort(u[:, 4:8], dim=1)  # [B,4] a random permutation per image
    applied = u[:, 8] < p
    blend = lambda img, other, f: (f.view(-1, 1, 1, 1) * img + (1 - f.view(-1, 1, 1, 1)) * other).clamp(0, 1)
    ops = [lambda img, f: (img * f.view(-1, 1, 1, 1)).clamp(0, 1),  # brightness
           lambda img, f: blend(img, gray(img).mean(dim=(1, 2, 3), keepdim=True), f),  # contrast
           lambda img, f: blend(img, gray(img), f),  # saturation
           adjust_hue]
    for position in range(4):
        for op_index, op in enumerate(ops):
            idx = (applied & (order[:, position] == op_index)).nonzero().flatten()
            if len(idx):
                x[idx] = op(x[idx], factors[op_index][idx])
    return x


def random_grayscale(x, u, p=0.2):
    """RandomGrayscale(p) from u [B, 1]."""
    idx = (u[:, 0] < p).nonzero().flatten()
    x[idx] = gray(x[idx]).expand(-1, 3, -1, -1)
    return x


def gaussian_blur(x, u, p, sigma=(0.1, 2.0), kernel_size=9):
    """RandomApply(GaussianBlur(kernel 9, sigma ~ U(0.1, 2)), p) with reflect padding, as torchvision; u [B, 2]."""
    idx = (u[:, 0] < p).nonzero().flatten()
    if len(idx) == 0:
        return x
    s = (sigma[0] + (sigma[1] - sigma[0]) * u[idx, 1]).float()  # [B']
    B, C, H, W = len(idx), *x.shape[1:]
    t = torch.linspace(-(kernel_size // 2), kernel_size // 2, kernel_size)
    kernel = torch.softmax(-0.5 * (t / s.view(-1, 1)) ** 2, dim=1)  # [B,9] = normalised Gaussian
    kernel = kernel.repeat_interleave(C, dim=0)  # [B*C,9]: one depthwise filter per image channel
    pad = kernel_size // 2
    y = F.pad(x[idx].reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)  # vertical pass
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)  # horizontal pass
    x[idx] = y.view(B, C, H, W)
    return x


def solarize(x, u, p=0.2, threshold=128 / 255):
    """RandomSolarize(threshold 128, p) from u [B, 1]."""
    idx = (u[:, 0] < p).nonzero().flatten()
    x[idx] = torch.where(x[idx] >= threshold, 1.0 - x[idx], x[idx])
    return x


def augment_crops(images, u, size, scale, blur_p, solarize_p=0.0, blur_sigma=(0.1, 2.0)):
    """One crop of each image: random resized crop (bicubic) + flip + colour jitter + grayscale + blur
    (+ solarize) + normalise. images: list of [3,H,W] in [0,1]; u [B, DRAWS_PER_CROP] -> [B,3,size,size]."""
    draws = Draws(u)
    heights = np.array([im.shape[1] for im in images])
    widths = np.array([im.shape[2] for im in images])
    top, left, h, w = sample_crop_boxes(draws.take("box"), heights, widths, scale)
    x = torch.cat([resize(im[:, t:t + hh, l:l + ww].unsqueeze(0), (size, size))
                   for im, t, l, hh, ww in zip(images, top, left, h, w)])  # [B,3,size,size]
    flip = draws.take("flip")[:, 0] < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = random_grayscale(color_jitter(x, draws.take("jitter")), draws.take("gray"))
    x = gaussian_blur(x, draws.take("blur"), blur_p, blur_sigma)
    x = solarize(x, draws.take("solarize"), solarize_p)
    return normalize(x)


def block_mask(rng, grid, n_target, min_patches=4, min_aspect=0.3, attempts=10):
    """BEiT/iBOT block-wise mask (official MaskingGenerator): add random rectangles of >= 4 patches with aspect
    in [0.3, 1/0.3] until about n_target patches are masked (never more). -> bool [grid, grid]."""
    mask = np.zeros((grid, grid), dtype=bool)
    max_block = int(0.5 * grid * grid)  # official max_num_patches = 0.5 * N
    log_aspect = (np.log(min_aspect), np.log(1 / min_aspect))
    while mask.sum() < n_target:
        budget, added = min(n_target - mask.sum(), max_block), 0
        for _ in range(attempts):
            area = min_patches + (budget - min_patches) * rng.random()  # random.uniform: budget may be < 4
            aspect = np.exp(rng.uniform(*log_aspect))
            h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if w < grid and h < grid:
                top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
        if added == 0:
            break
    return mask


def mask_plan(seed, step, n_crops, ratio=(0.1, 0.5), probability=0.5):
    """Which global crops of step `step` are masked and how much (Sec. 4 / iBOT): a fraction `probability` of
    the n_crops crops of the whole global batch, with target ratios spread uniformly over `ratio` (one
    sub-interval of a linspace each), assigned in a random order. -> (rank [n_crops], bounds): crop k is masked
    with a ratio in [bounds[rank[k]], bounds[rank[k] + 1]) when rank[k] < len(bounds) - 1."""
    n_masked = int(n_crops * probability)
    rank = np.random.default_rng([seed, step, 2]).permutation(n_crops)  # 2: a stream apart from the samples'
    return rank, np.linspace(ratio[0], ratio[1], n_masked + 1)


def sample_masks(rngs, crop_ids, plan, grid):
    """Block masks of the crops `crop_ids` (indices into the global batch's crops), each drawn by its image's
    generator in `rngs` -> bool [len(crop_ids), grid*grid] (True = masked, row-major)."""
    rank, bounds = plan
    N, masks = grid * grid, []
    for rng, k in zip(rngs, crop_ids):
        r = rank[k]
        masked = r < len(bounds) - 1
        masks.append(block_mask(rng, grid, int(N * rng.uniform(bounds[r], bounds[r + 1]))) if masked
                     else np.zeros((grid, grid), dtype=bool))
    return torch.from_numpy(np.stack(masks).reshape(len(crop_ids), N))


class MultiCropCollate:
    """Collate (image, label, (step, position)) items into a training batch (Sec. 4, App. B):
        global_crops [2B,3,G,G] (crop-major: first crop of every image, then the second), local_crops [nB,3,L,L],
        masks bool [2B,N], mask_indices [M] (flat indices of the masked patches into [2B*N], computed here on
        the CPU so the model gathers with a known shape: no host sync, traceable), mask_weights [M]
        (1 / #masked of the token's crop, for ibot_loss), labels [B].
    `position` is the sample's index in the global batch of `step` (global_batch images): it seeds the sample's
    augmentation and, with the step, its mask. Blur probabilities 1.0 / 0.1 / 0.5 (global 1, global 2, locals)
    are the paper's; the official code applies 0.0 / 0.9 / 0.5, because its GaussianBlur passes p=1-p to
    RandomApply (github.com/facebookresearch/dinov2 PR #411). Solarisation p=0.2 on the second global crop."""

    def __init__(self, global_size, local_size, n_local, patch_size, global_scale=(0.32, 1.0),
                 local_scale=(0.05, 0.32), mask_ratio=(0.1, 0.5), mask_probability=0.5, blur_sigma=(0.1, 2.0),
                 seed=0, global_batch=None):
        self.global_size, self.local_size, self.n_local, self.patch_size = global_size, local_size, n_local, patch_size
        self.global_scale, self.local_scale, self.blur_sigma = global_scale, local_scale, blur_sigma
        self.mask_ratio, self.mask_probability = mask_ratio, mask_probability
        self.seed, self.global_batch = seed, global_batch

    def __call__(self, items):
        images, labels, keys = zip(*items)
        steps, positions = zip(*keys)
        assert len(set(steps)) == 1, "a micro-batch holds samples of one step"
        global_batch = self.global_batch or len(items)  # None: the batch is the whole global batch (tests)
        rngs = [np.random.default_rng([self.seed, steps[0], j]) for j in positions]  # one stream per sample
        n_crops = 2 + self.n_local
        u = torch.from_numpy(np.stack([rng.random((DRAWS_PER_CROP, n_crops)).T for rng in rngs]))  # [B,crops,36]
        G, L = self.global_size, self.local_size
        crop = partial(augment_crops, images, blur_sigma=self.blur_sigma)
        global_crops = torch.cat([crop(u[:, 0], G, self.global_scale, blur_p=1.0),
                                  crop(u[:, 1], G, self.global_scale, blur_p=0.1, solarize_p=0.2)])
        local_crops = [crop(u[:, 2 + i], L, self.local_scale, blur_p=0.5) for i in range(self.n_local)]
        local_crops = torch.cat(local_crops) if local_crops else torch.empty(0, 3, L, L)
        plan = mask_plan(self.seed, steps[0], 2 * global_batch, self.mask_ratio, self.mask_probability)
        crop_ids = [c * global_batch + j for c in range(2) for j in positions]  # crop-major, as global_crops
        masks = sample_masks(rngs * 2, crop_ids, plan, G // self.patch_size)  # [2B,N]
        return dict(global_crops=global_crops, local_crops=local_crops, masks=masks,
                    mask_indices=masks.flatten().nonzero().flatten(),  # [M]
                    mask_weights=ibot_mask_weights(masks),  # [M]
                    labels=torch.tensor(labels))


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
