"""What curate.py's steps stand on: image embeddings and the faiss search over them. Three parts:
  - a copy-detection embedding for deduplicating small grey images on a CPU (CopyDescriptor, the SSCD stand-in);
  - embedding files: every image of a source embedded once by a backbone ("pixels", "copy" or any checkpoint
    model.load_model reads) into <out>/emb_<name>_<key>.npy with a .json manifest of what it depends on (source
    path, backbone, image size, image count). Under torchrun every rank writes page-aligned rows of the same
    file, so --out must be one folder that every node sees; a file is renamed into place only when complete;
  - faiss: k-means, exact or IVF-PQ indexes (sharded over GPUs when present), k-NN search with exact rescoring.

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
  App. A.3, copy-detection embedding (SSCD) ......... CopyDescriptor (features + learned whitening)
  SSCD / DISC21, edits as positives ................. random_edit (used only to learn the projection)
  learned whitening from positive pairs ............. learn_projection
  Sec. 3, an embedding of every image ............... load_source (cache keyed by cache_key), embed,
                                                      build_backbone
  App. A.2, cosine similarity ....................... rows_f32 (rows normalised on read), faiss inner product
  Sec. 3 "Implementation details", faiss on GPUs .... kmeans, train_index (IVF-PQ), fill_index, knn, rescore,
                                                      knn_edges

Shape legend: B images, H = W = 28 pixels, F hand-made features, D projected features or embedding width,
N rows of an embedding file, Q queries, k neighbours, C clusters.
"""
import hashlib
import io
import json
import math
import os
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from faiss.contrib import ivf_tools
from PIL import Image
from torch.utils.data import Subset

import cli
from data import IMAGENET_MEAN, IMAGENET_STD, FashionMNIST, build_dataset, extract_features
from losses import is_dist
from model import load_model
from runtime import get_rank, print0, progress, setup_distributed

SIZE = 28  # the descriptor's input side, px (Fashion-MNIST)
VERSION = "lw2"  # changes whenever features or learning change: part of the embedding cache key


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
    """Backbone-like module for embed: ImageNet-normalised [B,3,H,W] -> [B,D] copy-detection embedding
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


# ---------------------------------------------------------------------------------------------------------------
# Embedding files (Sec. 3: "we first compute an image embedding"): any backbone, cached, sharded over ranks
# ---------------------------------------------------------------------------------------------------------------
Source = namedtuple("Source", "name x ids_path dataset")  # x: [N,D] memmap; dataset: images for the montage
PAGE = 4096  # bytes: rank slices of one embedding file start on page boundaries (no page shared by two writers)


class PixelEmbedder(torch.nn.Module):
    """Stand-in backbone for demos and tests: standardised grey pixels (cosine = pixel correlation)."""

    def __init__(self, image_size):
        super().__init__()
        self.embed_dim = image_size * image_size

    def forward(self, x):  # [B,3,H,W] -> [B,HW]
        x = x.mean(dim=1).flatten(1)
        return x - x.mean(dim=1, keepdim=True)


def build_backbone(checkpoint, cfg, device):
    """"pixels", "copy" (CopyDescriptor, learned once and cached in --out) or a model.load_model checkpoint."""
    if checkpoint == "pixels":
        return PixelEmbedder(cfg.image_size)
    if checkpoint == "copy":
        return load_copy_descriptor(Path(cfg.out) / f"copy_descriptor_{VERSION}.npz")
    if checkpoint:
        return load_model(checkpoint).to(device)
    cli.error("embedding images needs --checkpoint (a model.load_model checkpoint, 'pixels' or 'copy')",
              "curate.py")


def source_name(spec):
    path = Path(spec.replace(":", "-"))
    return path.stem if spec.endswith(".npy") else path.name


def cache_key(spec, checkpoint, cfg, n):
    """What an embedding file depends on: the source (absolute path), the backbone (a file's path, size and
    modification time; a built-in's name and version), the input size and the number of images."""
    data, sep, split = spec.partition(":")
    source = spec if data == "fashion-mnist" else os.path.abspath(data) + sep + split
    if os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        backbone = f"{os.path.abspath(checkpoint)} {st.st_size} {st.st_mtime_ns}"
    else:
        backbone = f"{checkpoint} {VERSION}" if checkpoint == "copy" else checkpoint
    return dict(source=source, checkpoint=backbone, image_size=cfg.image_size, count=n)


def open_aligned_npy(path, shape, dtype):
    """A new .npy file of zeros whose data starts at byte PAGE: the header is padded with spaces (allowed by the
    format) so that row slices computed by row_slice start on page boundaries. -> writable memmap."""
    header = repr(dict(descr=np.lib.format.dtype_to_descr(np.dtype(dtype)), fortran_order=False,
                       shape=tuple(shape)))
    prefix = b"\x93NUMPY\x01\x00"  # magic, format version 1.0, then the header length (uint16) and the header
    with open(path, "wb") as f:
        f.write(prefix + (PAGE - 10).to_bytes(2, "little") + header.ljust(PAGE - 11).encode() + b"\n")
        f.truncate(PAGE + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return np.load(path, mmap_mode="r+")


def row_slice(n, row_bytes, rank, world):
    """Contiguous rows [lo, hi) of rank out of world, with lo * row_bytes a multiple of PAGE."""
    align = PAGE // math.gcd(row_bytes, PAGE)  # rows per whole number of pages
    lo, hi = (min(n, round(n * r / world / align) * align) for r in (rank, rank + 1))
    return lo, (n if rank == world - 1 else hi)


def embed(spec, dataset, checkpoint, cfg, path):
    """Embed every image of `dataset` into `path` ([N,D] .npy of L2-normalised embeddings) + `<stem>.ids.txt`.
    Under torchrun each rank writes a contiguous, page-aligned slice of rows into one memory-mapped file, which
    must sit on a folder every rank sees (a shared --out across nodes). Written under a temporary name and
    renamed when complete, so a crashed run leaves nothing that a later run would reuse."""
    rank, world, device = setup_distributed()
    backbone = build_backbone(checkpoint, cfg, device)
    n, tmp = len(dataset), Path(path).with_suffix(".tmp.npy")
    if rank == 0:
        open_aligned_npy(tmp, (n, backbone.embed_dim), cfg.emb_dtype)
    if is_dist():
        dist.barrier()
    emb = np.load(tmp, mmap_mode="r+")
    lo, hi = row_slice(n, emb.shape[1] * emb.itemsize, rank, world)
    for start in range(lo, hi, cfg.embed_chunk):
        end = min(start + cfg.embed_chunk, hi)
        feats, _ = extract_features(backbone, Subset(dataset, range(start, end)), cfg.image_size,
                                    cfg.batch_size, device, cfg.num_workers)  # [n,D] float32, L2-normalised
        emb[start:end] = feats.numpy().astype(emb.dtype)
    emb.flush()
    del emb
    if is_dist():
        dist.barrier()
    if rank == 0:
        paths = getattr(dataset, "paths", None)  # ImageFolder ids are file paths; others are "<name>:<row>"
        ids = Path(path).with_suffix(".ids.tmp.txt")
        with open(ids, "w") as f:
            f.writelines(f"{paths[i] if paths else f'{source_name(spec)}:{i}'}\n" for i in range(n))
        ids.replace(Path(path).with_suffix(".ids.txt"))
        tmp.replace(path)


def load_source(spec, cfg, checkpoint=None):
    """A source spec -> Source. Image sources are embedded with `checkpoint` (default cfg.checkpoint) into
    <out>/emb_<name>_<key>.npy on first use; <key> hashes cache_key, also written as a manifest (.json) beside
    it, so another folder of the same name, another backbone, size or image count never reuses the file."""
    name, dataset = source_name(spec), None
    if spec.endswith(".npy"):
        path = Path(spec)
    else:
        checkpoint = cfg.checkpoint if checkpoint is None else checkpoint
        data, _, split = spec.partition(":")  # "fashion-mnist:test" -> the test split
        dataset = build_dataset(data, train=split != "test")
        key = cache_key(spec, checkpoint, cfg, len(dataset))
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        path = Path(cfg.out) / f"emb_{name}_{digest}.npy"
        manifest = path.with_suffix(".json")
        fresh = manifest.exists() and path.exists() and json.loads(manifest.read_text()) == key
        if is_dist():
            dist.barrier()  # every rank has looked before rank 0 writes anything
        if not fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            embed(spec, dataset, checkpoint, cfg, str(path))
            if get_rank() == 0:
                manifest.write_text(json.dumps(key, indent=1))  # last: the manifest vouches for a whole file
            if is_dist():
                dist.barrier()
        print0(f"{spec}: embeddings {path} ({key['checkpoint']})")
    ids_path = path.with_suffix(".ids.txt")
    return Source(name, np.load(path, mmap_mode="r"), ids_path if ids_path.exists() else None, dataset)


def read_ids(src, rows=None):
    """Ids of the given rows (all when None), in their order, read in one pass over the ids file."""
    if src.ids_path is None:
        return [f"{src.name}:{r}" for r in (range(len(src.x)) if rows is None else rows)]
    with open(src.ids_path) as f:
        if rows is None:
            return [line.rstrip("\n") for line in f]
        wanted, found = set(int(r) for r in rows), {}
        for i, line in enumerate(f):
            if i in wanted:
                found[i] = line.rstrip("\n")
    return [found[int(r)] for r in rows]


def images_of(src, rows, size=64):
    """PIL images of rows of a source: from its dataset, or from its ids when they are image paths."""
    if src.dataset is not None:  # [3,H,W] in [0,1] -> PIL
        images = [Image.fromarray(np.uint8(src.dataset[int(r)][0].permute(1, 2, 0).numpy() * 255)) for r in rows]
    else:
        images = [Image.open(p).convert("RGB") for p in read_ids(src, rows) if os.path.isfile(p)]
    return [im.resize((size, size)) for im in images]


# ---------------------------------------------------------------------------------------------------------------
# faiss: k-means, indexes, k-NN search with exact rescoring (Sec. 3 "Implementation details")
# ---------------------------------------------------------------------------------------------------------------
# cfg, here and in the embedding files above, is curate.py's CurateConfig: each function reads the fields it names.
def use_gpu(cfg):
    return cfg.gpu and (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) > 0


def rows_f32(x, idx):
    """float32 L2-normalised copy of x[idx]: normalising on read makes unnormalised precomputed embeddings safe."""
    v = np.asarray(x[idx], dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


# A filled index over x[rows]: results map back to rows of x; exact = CPU flat index (scores need no rescoring);
# inv_norm [N] = 1 / |x_i| for the rescoring; probes = the rows' (coarse cosines, nearest lists) [n,nprobe].
Knn = namedtuple("Knn", "index rows exact x inv_norm probes")


def kmeans(v, k, cfg, niter=None, plusplus=False, spherical=True):
    """k-means of rows v [n,D] -> centroids [C,D]; faiss trains on <= 256 points per centroid. Spherical (unit
    centroids, cosine) for retrieval and the IVF lists; plain L2 for hierarchical k-means. Seeds: k random points
    (faiss), or k-means++ (Arthur & Vassilvitskii 2007: each next seed drawn with probability proportional to its
    squared distance to the seeds so far; k passes over the data, O(n k D))."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    km = faiss.Kmeans(v.shape[1], k, niter=niter or cfg.kmeans_iters, seed=cfg.seed, spherical=spherical,
                      gpu=use_gpu(cfg), min_points_per_centroid=1, max_points_per_centroid=256)
    seeds = None
    if plusplus:  # in torch: one multithreaded matrix-vector product per seed
        pts, gen, seeds = torch.from_numpy(v), torch.Generator().manual_seed(cfg.seed), [0]
        sq = (pts * pts).sum(1)  # [n] squared norms
        d2 = (sq - 2 * pts @ pts[0] + sq[0]).clamp(min=0)  # [n] squared distance to the nearest seed
        for _ in range(k - 1):
            seeds.append(int(torch.multinomial(d2, 1, generator=gen)) if d2.sum() > 0 else
                         int(torch.randint(len(v), (1,), generator=gen)))
            d2 = torch.minimum(d2, (sq - 2 * pts @ pts[seeds[-1]] + sq[seeds[-1]]).clamp(min=0))
    km.train(v, init_centroids=None if seeds is None else v[seeds])
    return km.centroids


def assign(x, rows, centroids, cfg):
    """Nearest centroid (cosine) of every x[rows] -> (cluster ids [n], cosine to it [n]), batched."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index = faiss.index_cpu_to_all_gpus(index) if use_gpu(cfg) else index
    index.add(centroids)
    labels, sims, b = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32), cfg.query_batch
    for s in progress(range(0, len(rows), b), desc="assign", leave=False, disable=len(rows) <= b):
        D, I = index.search(rows_f32(x, rows[s:s + b]), 1)  # [b,1]
        labels[s:s + b], sims[s:s + b] = I[:, 0], D[:, 0]
    return labels, sims


def train_index(x, rows, cfg):
    """Empty trained index for x[rows]: exact IndexFlatIP for small pools, IVF-PQ (as in the paper) for large."""
    d = x.shape[1]
    if len(rows) <= cfg.exact_max:
        return faiss.IndexFlatIP(d)
    nlist = cfg.ivf_lists or int(2 ** round(np.log2(4 * np.sqrt(len(rows)))))
    rng = np.random.default_rng(cfg.seed)
    sample = rows_f32(x, np.sort(rng.choice(rows, min(len(rows), nlist * cfg.ivf_train_per_list), replace=False)))
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans(sample, nlist, cfg, cfg.ivf_train_iters))  # holding nlist centroids: IVF trains PQ only
    m = max(m for m in range(1, cfg.pq_m + 1) if d % m == 0)  # PQ needs m | d (784 = 28 x 28: 28, not 32)
    if m != cfg.pq_m:
        print0(f"IVF-PQ: {m} sub-quantizers instead of pq_m={cfg.pq_m}, which does not divide the width {d}")
    index = faiss.IndexIVFPQ(quantizer, d, nlist, m, cfg.pq_bits, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.min_points_per_centroid = 1  # small pools: codebooks from what there is, no warnings
    index.train(sample[:64 << cfg.pq_bits])  # PQ codebooks on the residuals, 64 points per code
    return index


def fill_index(template, x, rows, cfg, keep_probes=False):
    """A copy of a trained empty index holding x[rows], sharded over the GPUs when present -> Knn.
    keep_probes (IVF on CPU): keep each row's nprobe nearest lists, so that searching the pool with itself
    (self-deduplication) reuses them instead of running the coarse quantizer a second time."""
    rows, ivf = np.asarray(rows), not isinstance(template, faiss.IndexFlat)
    index = faiss.clone_index(template)
    keep_probes = keep_probes and ivf and not use_gpu(cfg)
    if keep_probes:
        Dq, Iq = np.empty((len(rows), cfg.nprobe), np.float32), np.empty((len(rows), cfg.nprobe), np.int64)
    inv_norm = np.zeros(len(x), np.float32)
    if ivf:
        index.nprobe = cfg.nprobe
    if use_gpu(cfg):
        co = faiss.GpuMultipleClonerOptions()
        co.shard, co.useFloat16 = True, True  # the database split over the GPUs (Sec. 3: 8 V100 per node)
        index = faiss.index_cpu_to_all_gpus(index, co)
        if ivf:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", cfg.nprobe)
    b = cfg.query_batch
    for s in progress(range(0, len(rows), b), desc="index add", leave=False, disable=len(rows) <= b):
        v = np.asarray(x[rows[s:s + b]], dtype=np.float32)  # [b,D]
        inv_norm[rows[s:s + b]] = 1 / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
        v *= inv_norm[rows[s:s + b], None]
        if keep_probes:
            Dq[s:s + b], Iq[s:s + b] = index.quantizer.search(v, cfg.nprobe)  # [b,nprobe] nearest lists
            ivf_tools.add_preassigned(index, v, np.ascontiguousarray(Iq[s:s + b, 0]))
        else:
            index.add(v)
    exact = not ivf and not use_gpu(cfg)  # GPU flat indexes hold float16: their scores are rescored too
    return Knn(index, rows, exact, x, inv_norm, (Dq, Iq) if keep_probes else None)


def rescore(knn_index, q, I, chunk=1024):
    """Exact cosine of queries q [Q,D] with their candidates x[I] [Q,k] (-inf where I < 0). PQ scores err both
    ways (pairs above a threshold that exact cosine puts below it, true copies scored low; bench_curate.py's
    ivfpq stage counts the first), so no threshold or ranking ever uses them. Memory-bound: chunks run in threads (numpy releases the GIL in gathers
    and matmuls)."""
    S = np.empty(I.shape, np.float32)

    def score(s):
        valid = I[s:s + chunk] >= 0
        rows = np.where(valid, I[s:s + chunk], 0)
        cand = np.asarray(knn_index.x[rows], dtype=np.float32)  # [q,k,D]
        dots = np.matmul(cand, q[s:s + chunk, :, None])[..., 0]  # [q,k,D] @ [q,D,1] -> [q,k]
        S[s:s + chunk] = np.where(valid, dots * knn_index.inv_norm[rows], -np.inf)

    with ThreadPoolExecutor(faiss.omp_get_max_threads()) as pool:
        list(pool.map(score, range(0, len(I), chunk)))
    return S


def knn(knn_index, q, qrows, k, cfg, probes=None):
    """Yield (query rows, neighbour rows of x [b,k], exact cosine [b,k]) per batch of queries q[qrows].
    probes: the queries' (coarse cosines, lists) [Q,nprobe] when known (fill_index keep_probes)."""
    b = cfg.query_batch
    for s in progress(range(0, len(qrows), b), desc=f"search k={k}", leave=False, disable=len(qrows) <= b):
        qb = rows_f32(q, qrows[s:s + b])  # [b,D]
        if probes is None:
            D, I = knn_index.index.search(qb, k)  # [b,k] positions in knn_index.rows
        else:
            D, I = ivf_tools.search_preassigned(knn_index.index, qb, k, probes[1][s:s + b], probes[0][s:s + b])
        I = np.where(I >= 0, knn_index.rows[np.maximum(I, 0)], -1)
        yield qrows[s:s + b], I, (np.where(I >= 0, D, -np.inf) if knn_index.exact else rescore(knn_index, qb, I))


def knn_edges(knn_index, q, qrows, k, threshold, cfg, skip_self=False, probes=None):
    """Pairs (query row, pool row, exact cosine) among each query's k nearest with cosine > threshold."""
    a, b, s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for qr, I, S in knn(knn_index, q, qrows, k + int(skip_self), cfg, probes):
        r, c = np.nonzero((S > threshold) & ((I != qr[:, None]) if skip_self else True))
        a.append(qr[r]), b.append(I[r, c]), s.append(S[r, c])
    return np.concatenate(a), np.concatenate(b), np.concatenate(s)
