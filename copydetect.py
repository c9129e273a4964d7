"""The copy-detection embedding that curate.py deduplicates with on a CPU (App. A.3): CopyDescriptor, a stand-in
for SSCD. embeddings.py builds it as the "copy" backbone (curate.py --copy_checkpoint copy) and caches its
embeddings like any other backbone's.

DINOv2 deduplicates with a copy-detection model (App. A.3: SSCD, Pizzi et al. 2022), not with its retrieval ViT,
because copies differ by crops, shifts, colour and compression while distinct images may look alike. SSCD is a
ResNet trained contrastively with DISC21-style edits as positives. CopyDescriptor is a much smaller analog that
needs no GPU and ships no weights:
  1. pose and intensity normalisation by hand: each image is shifted to its centre of mass and scaled to a fixed
     radius of gyration (so shifts and small crops/rescales mostly cancel), its grey levels taken relative to its
     own 2nd-98th percentiles (brightness and contrast cancel);
  2. a fixed feature vector of the normalised image: its pixels, a band-pass of them (texture), its gradient
     magnitudes, and the square-rooted Fourier magnitudes of the raw image (invariant to circular shifts);
  3. a learned linear projection, "learned whitening" (Mikolajczyk & Matas 2007; Radenovic et al. 2018): whiten
     the differences between two random edits of the same image (the positives), then keep the top `dim`
     directions of the whitened spread of distinct images, each scaled to unit variance. Cosine in that space is
     high for edits of one image and spread out for distinct images, so one threshold separates them.
The projection is learned in closed form (a Cholesky factor and one eigendecomposition) from the last 20,000
Fashion-MNIST training images and a random edit of each (`learn_copy_descriptor`), once per process, and cached
in curate.py's --out; it is deterministic, so no weights are committed. It is linear on hand-made features, not
a trained network: it knows only the edits below (shifts up to 2 px, crops up to 2 px a side, brightness,
contrast, noise, JPEG) and only 28 px grey garments. `python bench_curate.py --stage copies` measures it on
planted copies of held-out test images (numbers in the README). Its weak spots: 2-px shifts of garments that
touch the frame (content leaves the image) and, at 60,000 images, chains of distinct trousers of one cut.

Paper -> code
  App. A.3, copy-detection embedding (SSCD) ......... CopyDescriptor (features + learned whitening),
                                                      load_copy_descriptor (learned once, cached)
  SSCD / DISC21, edits as positives ................. random_edit (used only to learn the projection)
  learned whitening from positive pairs ............. learn_projection

Shape legend: B images, H = W = 28 pixels, F hand-made features, D projected features, N training images.
"""
import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from augment import IMAGENET_MEAN, IMAGENET_STD
from data import FashionMNIST, build_dataset

SIZE = 28  # the descriptor's input side, px (Fashion-MNIST)
VERSION = "lw2"  # changes whenever features or learning change: part of embeddings.cache_key


# ---------------------------------------------------------------------------------------------------------------
# Edits (DISC21-style, for grey [H,W] float images in [0,1]): the positives the projection is learned from
# ---------------------------------------------------------------------------------------------------------------
def shift(img, dy, dx):
    """Translate by (dy, dx) pixels, filling with black (what a shifted Fashion-MNIST crop looks like)."""
    out, (h, w) = np.zeros_like(img), img.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0),
                                                                     max(-dx, 0):w + min(-dx, 0)]
    return out


def jpeg(img, quality):
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255 + 0.5)).save(buf, "JPEG", quality=int(quality))
    return np.asarray(Image.open(buf), np.float32) / 255


def crop_resize(img, top, left, bottom, right):
    """Cut the given numbers of pixels off each side and resize back (bicubic): a small crop and rescale."""
    h, w = img.shape
    crop = Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255 + 0.5))
    crop = crop.crop((left, top, w - right, h - bottom)).resize((w, h), Image.BICUBIC)
    return np.asarray(crop, np.float32) / 255


def random_edit(img, rng):
    """One DISC21-style edit: photometric (brightness, contrast, noise or JPEG) or geometric (a crop and rescale),
    and half of the time a shift of up to 2 px on top."""
    kind = rng.integers(6)
    if kind == 0:
        out = img * rng.uniform(0.6, 1.4) if rng.random() < 0.5 else img + rng.uniform(-0.2, 0.2)
    elif kind == 1:
        out = (img - img.mean()) * rng.uniform(0.6, 1.4) + img.mean()
    elif kind == 2:
        out = img + rng.normal(0, 0.05, img.shape)
    elif kind == 3:
        out = jpeg(img, rng.integers(30, 80))
    else:
        out = crop_resize(img, *rng.integers(0, 3, 4))
    out = np.clip(out, 0, 1)
    return shift(out, *rng.integers(-2, 3, 2)) if rng.random() < 0.5 else out


# ---------------------------------------------------------------------------------------------------------------
# Hand-made features: pose and intensity normalisation, then pixels, gradients and Fourier magnitudes
# ---------------------------------------------------------------------------------------------------------------
def blur_matrix(n, sigma):
    """[n,n] matrix of a 1-D Gaussian blur with replicate padding (row i: the weights of output pixel i)."""
    r = int(np.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    m = torch.zeros(n, n)
    for i in range(n):
        for j, w in zip(range(i - r, i + r + 1), k):
            m[i, min(max(j, 0), n - 1)] += w
    return m


def blur(x, sigma):
    """Separable Gaussian blur of [B,1,H,W] (replicate padding), as two small matrix products."""
    return blur_matrix(x.shape[-2], sigma) @ x @ blur_matrix(x.shape[-1], sigma).T  # [H,H] @ [B,1,H,W] @ [W,W]


def normalise_pose(x, threshold=0.2, radius=0.5):
    """[B,1,H,W] grey in [0,1] -> the same images minus their dark level, resampled so that the centre of mass of
    the object (pixels above `threshold` of the 2nd-98th percentile range, on a slightly blurred copy so noise
    does not move it) is at the centre and its radius of gyration is `radius` (in [-1,1] image coordinates)."""
    B, _, H, W = x.shape
    smooth = blur(x, 0.8).flatten(1)  # [B,HW]
    k = max(1, round(0.02 * H * W))
    lo = smooth.kthvalue(k, dim=1).values.view(B, 1, 1, 1)  # 2nd percentile
    hi = smooth.kthvalue(H * W + 1 - k, dim=1).values.view(B, 1, 1, 1)  # 98th percentile
    weight = (smooth.view_as(x) - lo - threshold * (hi - lo)).clamp(min=0)  # [B,1,H,W] object mass
    ys, xs = torch.linspace(-1, 1, H).view(1, 1, H, 1), torch.linspace(-1, 1, W).view(1, 1, 1, W)
    mass = weight.sum((1, 2, 3)) + 1e-6
    cy, cx = (weight * ys).sum((1, 2, 3)) / mass, (weight * xs).sum((1, 2, 3)) / mass  # [B]
    r2 = (weight * ((ys - cy.view(B, 1, 1, 1)) ** 2 + (xs - cx.view(B, 1, 1, 1)) ** 2)).sum((1, 2, 3)) / mass
    scale = r2.sqrt() / radius
    theta = torch.zeros(B, 2, 3)  # output grid -> input coordinates: scaled about the centre of mass
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, cx, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x - lo, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def standardise(v):
    """[B,...] -> [B,n] with zero mean and unit norm per row: invariant to brightness and contrast."""
    v = v.flatten(1)
    return F.normalize(v - v.mean(1, keepdim=True), dim=1)


def features(x):
    """[B,1,H,W] grey in [0,1] -> [B,F] hand-made features (F = 784 + 784 + 729 + 420 at 28 px): the normalised
    image blurred (sigma 1 px), band-passed (sigma 0.5 minus sigma 2: texture, which tells apart garments of one
    silhouette), its gradient magnitude, and the Fourier magnitudes of the raw image."""
    pose = normalise_pose(x)  # [B,1,H,W]
    aligned = blur(pose, 1.0)
    gy = aligned[:, :, 1:, :-1] - aligned[:, :, :-1, :-1]  # [B,1,H-1,W-1]
    gx = aligned[:, :, :-1, 1:] - aligned[:, :, :-1, :-1]
    spectrum = torch.fft.rfft2(x[:, 0] - x.mean((1, 2, 3)).view(-1, 1, 1)).abs()  # [B,H,W/2+1]
    return torch.cat([standardise(aligned), standardise(blur(pose, 0.5) - blur(pose, 2.0)),
                      standardise((gx ** 2 + gy ** 2 + 1e-6).sqrt()),
                      F.normalize(spectrum.sqrt().flatten(1), dim=1)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Learned whitening and the embedding module
# ---------------------------------------------------------------------------------------------------------------
def learn_projection(f, f_edit, dim, ridge=1e-2):
    """Learned whitening. f [N,F] features of distinct images; f_edit [N,F] of an edited copy of each.
    -> (mean [F], projection [D,F]): x -> projection @ (x - mean) whitens the edit differences (covariance C_S,
    ridge-regularised, whitened by its Cholesky factor L), then keeps the D directions along which distinct images
    spread most (top eigenvectors of the whitened covariance L^-1 C_D L^-T), each scaled to unit variance: the
    top D solutions of the generalised eigenproblem C_D v = lambda C_S v."""
    f, f_edit = torch.as_tensor(f), torch.as_tensor(f_edit)
    mean = f.mean(0)
    diff, centred = f - f_edit, f - mean  # [N,F]
    c_same = diff.T @ diff / len(diff)  # [F,F] covariance of edit differences
    c_dist = centred.T @ centred / len(centred)  # [F,F] covariance of distinct images
    c_same += ridge * c_same.diagonal().mean() * torch.eye(len(c_same))  # float32 is enough with this ridge
    whiten = torch.linalg.inv(torch.linalg.cholesky(c_same))  # [F,F] L^-1
    e2, U = torch.linalg.eigh(whiten @ c_dist @ whiten.T)  # ascending
    top = torch.argsort(e2, descending=True)[:dim]
    projection = (U[:, top] / e2[top].sqrt()).T @ whiten  # [D,F]
    return mean.numpy(), projection.numpy()


def learn_copy_descriptor(n_images=20_000, dim=400, seed=0, root=None):
    """Fashion-MNIST training images (the last n_images; root: a folder of its IDX files, default: data.py's copy,
    downloaded if needed) and a random edit of each -> (mean, projection)."""
    rng = np.random.default_rng(seed)
    train = FashionMNIST(root, train=True) if root else build_dataset("fashion-mnist", train=True)
    images = train.images[-n_images:].astype(np.float32) / 255  # [N,H,W]
    edits = np.stack([random_edit(im, rng) for im in images]).astype(np.float32)
    f, f_edit = (features(torch.from_numpy(v)[:, None]) for v in (images, edits))  # [N,F] each
    return learn_projection(f, f_edit, dim)


class CopyDescriptor(torch.nn.Module):
    """Backbone-like module for embeddings.embed: ImageNet-normalised [B,3,H,W] -> [B,D] copy-detection embedding
    (compare by cosine; the tiny preset calls two images copies above 0.875)."""

    def __init__(self, mean, projection):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean))  # [F]
        self.register_buffer("projection", torch.as_tensor(projection))  # [D,F]
        self.embed_dim = self.projection.shape[0]

    def forward(self, x):  # [B,3,H,W] ImageNet-normalised
        std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        grey = (x.float().cpu() * std + mean).mean(1, keepdim=True).clamp(0, 1)  # [B,1,H,W] back in [0,1]
        if grey.shape[-2:] != (SIZE, SIZE):
            grey = F.interpolate(grey, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return (features(grey) - self.mean) @ self.projection.T  # [B,F] @ [F,D] -> [B,D]


@lru_cache(maxsize=1)
def _learned():
    return learn_copy_descriptor()


def load_copy_descriptor(cache_path):
    """The copy descriptor, learned once per process and stored at cache_path (.npz) for later runs."""
    cache_path = Path(cache_path)
    if cache_path.exists():
        saved = np.load(cache_path)
        if str(saved["version"]) == VERSION:
            return CopyDescriptor(saved["mean"], saved["projection"])
    mean, projection = _learned()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f"{cache_path.stem}.{os.getpid()}.tmp.npz")  # ranks learn it side by side
    np.savez(tmp, mean=mean, projection=projection, version=VERSION)
    tmp.replace(cache_path)  # never a half-written file under the final name
    return CopyDescriptor(mean, projection)
