"""The LVD-142M data pipeline of DINOv2 (Sec. 3, App. A): embed, deduplicate, retrieve -- with faiss, at any scale.

Uncurated pool + curated datasets -> an embedding of every image -> near-duplicates removed inside the pool ->
pool images close to evaluation sets removed -> pool images close to each curated dataset retrieved ->
curated.tsv (id, source, dataset), stats.json (every step), montage.png (duplicate groups, retrieved neighbours).
As in the paper, two embeddings: a copy detector's for deduplication (--copy_checkpoint; the tiny preset uses
copydetect.py's, a hand-made + learned-whitening stand-in for SSCD) and the retrieval backbone's (--checkpoint).
Embeddings are cached in --out as emb_<name>_<key>.npy + a .json manifest (source path, backbone, image size,
image count); under torchrun every rank writes page-aligned rows of the same file, so --out must be one folder
that every node sees.

Run (a source is an image folder, "fashion-mnist" / "fashion-mnist:test", or precomputed embeddings <name>.npy
with an optional <name>.ids.txt; every sub-command takes the CurateConfig fields as --field value):
    python curate.py run --preset tiny --pool fashion-mnist --curated fashion-mnist:test  # ~2 min on 2 CPU cores
    python curate.py embed --pool <folder> --checkpoint teacher_backbone.pth    # -> out/curate/emb_<name>_<key>.npy
    torchrun --nproc_per_node 8 curate.py embed ...  # each rank embeds a contiguous slice of the images
    python curate.py dedup --pool emb.npy --eval_sets a.npy,b.npy               # -> out/curate/pool_status.npy
    torchrun --nnodes 20 --nproc_per_node 1 ... curate.py dedup ...  # one process per node, index on its GPUs
    python curate.py retrieve --pool emb.npy --curated c.npy                    # -> out/curate/curated.tsv
    python bench_curate.py                           # 1M-embedding CPU benchmark (numbers in the README)

Paper -> code
  Sec. 3, an embedding of every image ........................ embed (any backbone model.load_model reads),
                                                               load_source (cache keyed by cache_key)
  App. A.3, a copy-detection embedding (SSCD) ................ copydetect.CopyDescriptor (tiny preset)
  App. A.2, cosine similarity ................................ rows normalised on read, faiss inner product
  Sec. 3 "Implementation details", faiss IVF-PQ on GPUs ...... train_index, fill_index, knn, rescore
  App. A.3, self-deduplication (k = 64, > 0.6, components) ... knn_edges, connected_components, self_dedup
  App. A.3, relative deduplication (> 0.45, whole component) . relative_dedup
  App. A.4, sample-based retrieval (k nearest per image) ..... sample_retrieval, sample_k_of (32 for IN-1k)
  App. A.4, cluster-based retrieval (> 3 images, 10k, 1M) .... kmeans, assign, cluster_retrieval
  Vo et al. 2024, hierarchical k-means, balanced sampling .... hierarchical_kmeans, balanced_split,
                                                               hierarchical_sampling

Shape legend: N pool images, Q queries, D embedding width, k neighbours, C clusters.
"""
import dataclasses
import hashlib
import json
import math
import os
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
from faiss.contrib import ivf_tools
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Subset

import cli
from cli import at_least, in_range, one_of
from copydetect import VERSION as COPY_VERSION
from copydetect import load_copy_descriptor
from data import build_dataset, extract_features
from model import load_model
from runtime import progress


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CurateConfig:
    # sources (comma-separated lists) and outputs
    pool: str = ""  # the uncurated source (Sec. 3: 1.2B web images)
    curated: str = ""  # curated datasets to retrieve for (Tab. 15: ImageNet-22k, ImageNet-1k, Landmarks, ...)
    eval_sets: str = ""  # evaluation sets to deduplicate against (App. A.3: train and test splits of benchmarks)
    out: str = "out/curate"  # output folder
    checkpoint: str = ""  # backbone for embeddings (paper: SSL ViT-H/16 on IN-22k); "pixels" = standardised pixels
    copy_checkpoint: str = ""  # embedding for deduplication (App. A.3: the SSCD copy detector); "" = checkpoint;
    # "copy" = copydetect.py's descriptor for 28-px grey images (learned whitening, an SSCD stand-in)
    image_size: int = 224  # embedding input resolution, px
    batch_size: int = 256  # images per embedding forward
    num_workers: int = 8  # DataLoader workers decoding images for the embedding
    emb_dtype: str = "float16"  # stored embeddings; float16 halves the disk (2.4 TB at 1.2B x 1024)
    embed_chunk: int = 65536  # images per extract_features call (bounds host memory)
    # deduplication (App. A.3)
    dedup_k: int = 64  # nearest neighbours searched per pool image
    dedup_threshold: float = 0.6  # cosine above which two pool images are duplicates
    relative_threshold: float = 0.45  # cosine above which a pool image duplicates an evaluation image
    # retrieval (App. A.4)
    retrieval: str = "auto"  # auto | sample | cluster | hierarchical; auto: sample-based for large datasets
    sample_min_size: int = 1_000_000  # auto: datasets of at least this many images use sample-based retrieval
    sample_k: int = 4  # pool neighbours per curated image (paper: 4 for most datasets)
    sample_k_sets: str = ""  # per-dataset sample_k, "name:k,name:k" by source name (paper: imagenet-1k:32)
    images_per_cluster: int = 7_440  # pool images per k-means cluster: ~744M deduplicated / 100,000 clusters
    max_clusters: int = 100_000  # k-means clusters of the pool (paper: 100,000)
    cluster_min_count: int = 3  # a cluster is retrieved when it holds MORE than this many curated images
    cluster_take: int = 10_000  # M: pool images sampled from each retrieved cluster
    dataset_cap: int = 1_000_000  # most images retrieved through clusters for one dataset
    kmeans_iters: int = 20  # Lloyd iterations of the retrieval k-means
    # hierarchical k-means + balanced sampling (Vo et al. 2024: 4 levels, 10M/500k/50k/10k clusters of 743M images)
    hkm_branching: str = "74,20,10,5"  # points per cluster at level 1, then centroids per cluster at each level
    hkm_resample: str = "1,10,5,3"  # r closest points per cluster refit in the resampling steps (<= 1: none)
    hkm_resample_steps: int = 10  # resampling-clustering steps per level
    hkm_target: int = 142_000_000  # images to sample (LVD-142M's size, for comparison)
    hkm_strategy: str = "c"  # inside a leaf cluster: c = closest to the centroid first, r = random
    hkm_iters: int = 50  # Lloyd iterations per level (ssl-data-curation's configs: 50)
    # faiss (Sec. 3 "Implementation details")
    exact_max: int = 200_000  # pools up to this size use exact IndexFlatIP, larger ones IVF-PQ
    ivf_lists: int = 0  # inverted lists; 0 = the power of two nearest 4 sqrt(N) (4096 at 1M)
    ivf_train_per_list: int = 64  # coarse k-means points per list (16: 97.3% of planted duplicates at 1M)
    ivf_train_iters: int = 10  # Lloyd iterations of the coarse k-means (5: 98.7%, 10: 99.5% at 1M)
    pq_m: int = 32  # PQ sub-quantizers = bytes per code at 8 bits
    pq_bits: int = 8  # bits per sub-quantizer code
    nprobe: int = 16  # inverted lists visited per query
    refine: int = 10  # PQ retrieval re-ranks refine x k candidates exactly (4: 84%, 10: 99% of the true 4-NN)
    query_batch: int = 16384  # queries per search call (bounds memory: query_batch x k candidates)
    gpu: bool = True  # faiss GPU indexes and k-means when faiss sees GPUs
    seed: int = 0
    montage_rows: int = 6  # duplicate groups and retrieval examples drawn in montage.png

    def __post_init__(self):
        self.check()

    def check(self):
        """Allowed values, one line each (cli.py turns a refusal into a one-line error)."""
        one_of("retrieval", self.retrieval, ("auto", "sample", "cluster", "hierarchical"))
        one_of("emb_dtype", self.emb_dtype, ("float16", "float32"))
        one_of("hkm_strategy", self.hkm_strategy, ("c", "r"))
        for name in ("image_size", "batch_size", "embed_chunk", "dedup_k", "sample_min_size", "sample_k",
                     "images_per_cluster", "max_clusters", "cluster_take", "dataset_cap", "kmeans_iters",
                     "hkm_resample_steps", "hkm_target", "hkm_iters", "ivf_train_per_list",
                     "ivf_train_iters", "pq_m", "pq_bits", "nprobe", "refine", "query_batch"):
            at_least(name, getattr(self, name), 1)
        for name in ("num_workers", "cluster_min_count", "ivf_lists", "montage_rows", "exact_max"):
            at_least(name, getattr(self, name), 0)
        for name in ("dedup_threshold", "relative_threshold"):
            in_range(name, getattr(self, name), -1.0, 1.0)


PRESETS = {  # tiny: Fashion-MNIST-sized pools on a laptop CPU without a trained model. Deduplication uses the
    # copy descriptor of copydetect.py, thresholds chosen with `python bench_curate.py --stage copies [--copies_flags
    # "--dedup_threshold 0.85"]`: 0.875 merges pairs at precision 0.99 and finds 81% of 1-2 px shifted copies
    # (0.85: 0.978 and 85%); relative 0.8 removes 94.6% of the planted evaluation copies and 0.45% of the rest
    # (0.78: 95.6% and 0.66%). Retrieval uses standardised pixels, a stand-in for a trained backbone (pass
    # --checkpoint runs/tiny/teacher_backbone.pth).
    "tiny": dict(checkpoint="pixels", copy_checkpoint="copy", image_size=28, batch_size=512, num_workers=0,
                 images_per_cluster=1000, cluster_take=200, dataset_cap=5000, hkm_branching="20,10",
                 hkm_resample="1,4", hkm_resample_steps=3, hkm_target=5000, dedup_threshold=0.875,
                 relative_threshold=0.8),
}
COMMANDS = ("embed", "dedup", "retrieve", "run")


def parse_config(argv):
    """`<command> [--preset name] [--field value ...]` -> (command, CurateConfig), with cli.py's convention:
    --help lists every field; an unknown field or a bad value is a one-line error with exit status 2."""
    cfg, args = cli.parse_config(CurateConfig, argv, presets=PRESETS, prog="curate.py",
                                 positionals=[("command", "what to run", dict(choices=COMMANDS))],
                                 description=__doc__.split("\n\n")[0])
    return args.command, cfg


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun is optional: without RANK in the environment everything runs as one process)
# ---------------------------------------------------------------------------------------------------------------
def dist_info():
    """-> (rank, world size); the process group is created on first use when torchrun set RANK."""
    if "RANK" in os.environ and dist.is_available() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # Long timeout: ranks wait at barriers while rank 0 writes a billion ids or the slowest rank searches.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def print0(*args):
    if dist_info()[0] == 0:
        print(*args, flush=True)


def use_gpu(cfg):
    return cfg.gpu and (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) > 0


# ---------------------------------------------------------------------------------------------------------------
# Sources and embeddings (Sec. 3: "we first compute an image embedding")
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


def source_name(spec):
    path = Path(spec.replace(":", "-"))
    return path.stem if spec.endswith(".npy") else path.name


def open_dataset(spec):
    data, _, split = spec.partition(":")  # "fashion-mnist:test" -> the test split
    return build_dataset(data, train=split != "test")


def build_backbone(checkpoint, cfg, device):
    """"pixels", "copy" (copydetect.py, learned once and cached in --out) or a model.load_model checkpoint."""
    if checkpoint == "pixels":
        return PixelEmbedder(cfg.image_size)
    if checkpoint == "copy":
        return load_copy_descriptor(Path(cfg.out) / f"copy_descriptor_{COPY_VERSION}.npz")
    if checkpoint:
        return load_model(checkpoint).to(device)
    sys.exit("embedding images needs --checkpoint (a model.load_model checkpoint, 'pixels' or 'copy')")


def cache_key(spec, checkpoint, cfg, n):
    """What an embedding file depends on: the source (absolute path), the backbone (a file's path, size and
    modification time; a built-in's name and version), the input size and the number of images."""
    data, sep, split = spec.partition(":")
    source = spec if data == "fashion-mnist" else os.path.abspath(data) + sep + split
    if os.path.isfile(checkpoint):
        st = os.stat(checkpoint)
        backbone = f"{os.path.abspath(checkpoint)} {st.st_size} {st.st_mtime_ns}"
    else:
        backbone = f"{checkpoint} {COPY_VERSION}" if checkpoint == "copy" else checkpoint
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
    rank, world = dist_info()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    backbone = build_backbone(checkpoint, cfg, device)
    n, tmp = len(dataset), Path(path).with_suffix(".tmp.npy")
    if rank == 0:
        open_aligned_npy(tmp, (n, backbone.embed_dim), cfg.emb_dtype)
    barrier()
    emb = np.load(tmp, mmap_mode="r+")
    lo, hi = row_slice(n, emb.shape[1] * emb.itemsize, rank, world)
    for start in range(lo, hi, cfg.embed_chunk):
        end = min(start + cfg.embed_chunk, hi)
        feats, _ = extract_features(backbone, Subset(dataset, range(start, end)), cfg.image_size,
                                    cfg.batch_size, device, cfg.num_workers)  # [n,D] float32, L2-normalised
        emb[start:end] = feats.numpy().astype(emb.dtype)
    emb.flush()
    del emb
    barrier()
    if rank == 0:
        paths = getattr(dataset, "paths", None)  # ImageFolder ids are file paths; others are "<name>:<row>"
        ids = Path(path).with_suffix(".ids.tmp.txt")
        with open(ids, "w") as f:
            f.writelines(f"{paths[i] if paths else f'{source_name(spec)}:{i}'}\n" for i in range(n))
        ids.replace(Path(path).with_suffix(".ids.txt"))
        tmp.replace(path)


def load_source(spec, cfg, checkpoint=None):
    """A source spec -> Source. Image sources are embedded with `checkpoint` (default --checkpoint) into
    <out>/emb_<name>_<key>.npy on first use; <key> hashes cache_key, also written as a manifest (.json) beside
    it, so another folder of the same name, another backbone, size or image count never reuses the file."""
    name, dataset = source_name(spec), None
    if spec.endswith(".npy"):
        path = Path(spec)
    else:
        checkpoint = cfg.checkpoint if checkpoint is None else checkpoint
        dataset = open_dataset(spec)
        key = cache_key(spec, checkpoint, cfg, len(dataset))
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        path = Path(cfg.out) / f"emb_{name}_{digest}.npy"
        manifest = path.with_suffix(".json")
        fresh = manifest.exists() and path.exists() and json.loads(manifest.read_text()) == key
        barrier()  # every rank has looked before rank 0 writes anything
        if not fresh:
            path.parent.mkdir(parents=True, exist_ok=True)
            embed(spec, dataset, checkpoint, cfg, str(path))
            if dist_info()[0] == 0:
                manifest.write_text(json.dumps(key, indent=1))  # last: the manifest vouches for a whole file
            barrier()
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


def rows_f32(x, idx):
    """float32 L2-normalised copy of x[idx]: normalising on read makes unnormalised precomputed embeddings safe."""
    v = np.asarray(x[idx], dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# faiss: k-means, indexes, k-NN search with exact rescoring (Sec. 3 "Implementation details")
# ---------------------------------------------------------------------------------------------------------------
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
    """Exact cosine of queries q [Q,D] with their candidates x[I] [Q,k] (-inf where I < 0). PQ scores are off
    both ways (bench_curate.py, 1M: 4.6x more candidate pairs above 0.6 than exact cosine, true copies ~0.15
    low), so no threshold or ranking ever uses them. Memory-bound: chunks run in threads (numpy releases the GIL
    in gathers and matmuls)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Deduplication (App. A.3)
# ---------------------------------------------------------------------------------------------------------------
def connected_components(n, a, b):
    """Disjoint sets over n nodes joined by edges (a, b) -> root of each node = smallest index of its component.

    Vectorised union-find (hook larger roots under smaller ones, then pointer jumping): a few numpy passes over
    the edge list instead of a Python step per edge, so it scales to billions of edges (App. A.3 "scalable
    disjoint set data structure")."""
    parent = np.arange(n)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]  # roots (parent is fully compressed here)
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi  # an edge inside one component stays inside it: dropped for good
        a, b, lo, hi = a[live], b[live], lo[live], hi[live]
        np.minimum.at(parent, hi, lo)  # hook; parent[i] <= i always, so no cycles
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def self_dedup(n, a, b, s, cfg):
    """Components of the pairs with cosine > 0.6 -> roots [n]; a root (smallest index) is the image kept."""
    return connected_components(n, a[s > cfg.dedup_threshold], b[s > cfg.dedup_threshold])


def relative_dedup(keep, a, b, s, touched, cfg):
    """Drop every kept pool image whose component (pool pairs > 0.45 among kept images) holds a `touched` image,
    one within 0.45 of an evaluation image: "identifying the duplicate components ... and discarding it
    entirely" (App. A.3). -> the new keep mask."""
    link = (s > cfg.relative_threshold) & keep[a] & keep[b]
    roots = connected_components(len(keep), a[link], b[link])
    bad = np.zeros(len(keep), bool)
    bad[roots[touched]] = True
    return keep & ~bad[roots]


def pool_edges(index, pool, threshold, cfg):
    """The pool searched with itself -> pairs (a, b, exact cosine > threshold). Under torchrun every rank holds
    the whole index and searches a contiguous slice of the queries; rank 0 gathers the pairs (None elsewhere)."""
    rank, world = dist_info()
    lo, hi = len(pool.x) * rank // world, len(pool.x) * (rank + 1) // world
    probes = None if index.probes is None else (index.probes[0][lo:hi], index.probes[1][lo:hi])
    edges = knn_edges(index, pool.x, np.arange(lo, hi), cfg.dedup_k, threshold, cfg, skip_self=True, probes=probes)
    if world == 1:
        return edges
    np.savez(Path(cfg.out) / f"edges.rank{rank}.npz", *edges)
    barrier()
    if rank > 0:
        return None
    paths = [Path(cfg.out) / f"edges.rank{r}.npz" for r in range(world)]
    parts = [dict(np.load(p)) for p in paths]
    for p in paths:
        p.unlink()
    return tuple(np.concatenate([p[f"arr_{i}"] for p in parts]) for i in range(3))


def check_widths(pool, sources, role):
    """Fail before any search when an evaluation or curated set was embedded by another backbone than the pool."""
    for src in sources:
        if src.x.shape[1] != pool.x.shape[1]:
            sys.exit(f"{role} {src.name} has {src.x.shape[1]}-d embeddings but the pool {pool.name} has "
                     f"{pool.x.shape[1]}-d: embed both with the same backbone")


def dedup(pool, evals, cfg, stats):
    """Self- then relative deduplication -> (status int8 [N]: 0 kept, 1 self-, 2 relative-duplicate; self-dedup
    roots [N]; the trained empty index, reused for retrieval); None on ranks > 0 once their search is done."""
    check_widths(pool, evals, "evaluation set")
    n, rows = len(pool.x), np.arange(len(pool.x))
    template = train_index(pool.x, rows, cfg)
    index = fill_index(template, pool.x, rows, cfg, keep_probes=True)
    # One search of the pool serves both steps: keep every pair above the lower threshold.
    edges = pool_edges(index, pool, min(cfg.dedup_threshold, cfg.relative_threshold) if evals else
                       cfg.dedup_threshold, cfg)
    if edges is None:
        return None
    a, b, s = edges
    roots = self_dedup(n, a, b, s, cfg)
    keep = roots == rows
    status, sizes = np.where(keep, 0, 1).astype(np.int8), np.bincount(roots, minlength=n)
    stats["self_dedup"] = dict(pool=n, index="flat" if isinstance(template, faiss.IndexFlat) else "ivfpq",
                               pairs=int((s > cfg.dedup_threshold).sum()), removed=int(n - keep.sum()),
                               kept=int(keep.sum()), groups=int((sizes > 1).sum()), largest_group=int(sizes.max()))
    for ev in evals:
        _, touched, _ = knn_edges(index, ev.x, np.arange(len(ev.x)), cfg.dedup_k, cfg.relative_threshold, cfg)
        before = keep.sum()
        keep = relative_dedup(keep, a, b, s, roots[touched], cfg)  # a removed duplicate stands for its root
        status[(status == 0) & ~keep] = 2
        stats.setdefault("relative_dedup", {})[ev.name] = dict(
            eval_images=len(ev.x), touched=len(np.unique(touched)), removed=int(before - keep.sum()),
            kept=int(keep.sum()))
    return status, roots, template


# ---------------------------------------------------------------------------------------------------------------
# Retrieval (App. A.4) and hierarchical k-means with balanced sampling (Vo et al. 2024)
# ---------------------------------------------------------------------------------------------------------------
def sample_k_of(name, cfg):
    """sample_k for the dataset of that source name: its sample_k_sets entry, else sample_k."""
    per_set = dict(item.rsplit(":", 1) for item in cfg.sample_k_sets.split(",") if item)
    return int(per_set.get(name, cfg.sample_k))


def sample_retrieval(knn_index, q, cfg, k=None):
    """The k (default sample_k) nearest pool images of every query, de-duplicated across queries -> (pool rows,
    stats). With PQ, refine x k candidates are re-ranked by exact cosine, so the k kept are (nearly) the true top k."""
    k, hits = k or cfg.sample_k, []
    for _, I, S in knn(knn_index, q, np.arange(len(q)), k if knn_index.exact else k * cfg.refine, cfg):
        top = np.argsort(-S, axis=1, kind="stable")[:, :k]  # [b,k] by exact cosine
        hits.append(np.take_along_axis(I, top, 1))
    hits = np.concatenate(hits).ravel()
    rows, found = np.unique(hits[hits >= 0]), int((hits >= 0).sum())
    return rows, dict(method="sample", queries=len(q), k=k, retrieved=len(rows), collisions=found - len(rows))


def cluster_retrieval(pool_labels, query_labels, n_clusters, cfg, rng):
    """Clusters holding more than cluster_min_count query images give up to cluster_take random pool images
    each, at most dataset_cap in all -> (positions into pool_labels, stats)."""
    eligible = np.bincount(query_labels, minlength=n_clusters) > cfg.cluster_min_count  # [C]
    order = np.lexsort((rng.random(len(pool_labels)), pool_labels))  # grouped by cluster, random inside
    rank = np.arange(len(order)) - np.searchsorted(pool_labels[order], pool_labels[order])  # place in cluster
    take = order[eligible[pool_labels[order]] & (rank < cfg.cluster_take)]
    capped = len(take) > cfg.dataset_cap
    if capped:
        take = rng.choice(take, cfg.dataset_cap, replace=False)
    return np.sort(take), dict(method="cluster", queries=len(query_labels), clusters=n_clusters,
                               clusters_retrieved=int(eligible.sum()), retrieved=len(take), capped=bool(capped))


def nearest_l2(pts, centroids):
    """Nearest centroid in L2 of every row of pts -> (cluster ids [n], minus the squared distance [n])."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    D, I = index.search(np.ascontiguousarray(pts, dtype=np.float32), 1)  # [n,1]
    return I[:, 0], -D[:, 0]


def hierarchical_kmeans(v, cfg):
    """Vo et al. 2024: level 1 clusters the points, level l > 1 the centroids of level l - 1. Resampling steps
    refit each level's centroids on the r points closest to each of them, which moves the centroids towards a
    uniform cover of the data. As in their code (facebookresearch/ssl-data-curation): L2 k-means, hkm_iters
    Lloyd iterations, k-means++ seeds at every level (on the level-1 points that costs k passes over the data:
    minutes at 100k points and 5k clusters on a CPU). -> (assignment per level, minus the squared distance of each
    point to its level-1 centroid: larger is closer)."""
    branching = [int(t) for t in cfg.hkm_branching.split(",")]
    resample = [int(t) for t in cfg.hkm_resample.split(",")]
    pts, assigns, leaf_sim = v, [], None
    for level, (per_cluster, r) in enumerate(zip(branching, resample)):
        k = max(1, len(pts) // per_cluster)
        centroids = kmeans(pts, k, cfg, cfg.hkm_iters, plusplus=True, spherical=False)
        labels, sims = nearest_l2(pts, centroids)
        for _ in range(cfg.hkm_resample_steps if r > 1 else 0):
            order = np.lexsort((-sims, labels))  # by cluster, closest first
            rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])  # place in cluster
            if (rank < r).sum() < k:  # empty clusters left too few points to refit k centroids
                break
            centroids = kmeans(pts[order[rank < r]], k, cfg, cfg.hkm_iters, plusplus=True, spherical=False)
            labels, sims = nearest_l2(pts, centroids)
        assigns.append(labels)
        leaf_sim = sims if level == 0 else leaf_sim
        pts = centroids
    return assigns, leaf_sim


def balanced_split(sizes, target, rng):
    """Samples per cluster: the same t from every cluster (all of the smaller ones), t the largest value with
    sum(min(size, t)) <= target, then one more from randomly chosen larger clusters to reach the target."""
    sizes = np.asarray(sizes, np.int64)
    if sizes.sum() <= target:
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # binary search on t
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(sizes, mid).sum() <= target else (lo, mid - 1)
    out = np.minimum(sizes, lo)
    out[rng.choice(np.nonzero(sizes > lo)[0], int(target - out.sum()), replace=False)] += 1
    return out


def hierarchical_sampling(assigns, leaf_sim, target, cfg, rng):
    """Balanced sampling down the hierarchy: the target split evenly over the top clusters, each cluster's share
    evenly over its children, ..., then points picked inside each leaf cluster -> sorted point indices."""
    point_labels = [assigns[0]]  # the cluster of every point at each level
    for a in assigns[1:]:
        point_labels.append(a[point_labels[-1]])
    quota = balanced_split(np.bincount(point_labels[-1]), target, rng)  # [C_top]
    for level in range(len(assigns) - 1, 0, -1):  # parents at `level`, children at `level - 1`
        child_sizes = np.bincount(point_labels[level - 1], minlength=len(assigns[level]))
        child_quota = np.zeros(len(child_sizes), np.int64)
        by_parent = np.argsort(assigns[level], kind="stable")  # children grouped by parent
        bounds = np.searchsorted(assigns[level][by_parent], np.arange(len(quota) + 1))
        for parent in np.nonzero(quota)[0]:
            children = by_parent[bounds[parent]:bounds[parent + 1]]
            child_quota[children] = balanced_split(child_sizes[children], quota[parent], rng)
        quota = child_quota
    labels = point_labels[0]
    order = np.lexsort((-leaf_sim if cfg.hkm_strategy == "c" else rng.random(len(labels)), labels))
    rank = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])  # place in leaf cluster
    return np.sort(order[rank < quota[labels[order]]])


def retrieve(pool, status, curated, template, cfg, stats):
    """Retrieval for every curated dataset from the kept pool -> [(pool rows, source, dataset name)]."""
    check_widths(pool, curated, "curated set")
    kept, rng, out = np.nonzero(status == 0)[0], np.random.default_rng(cfg.seed), []
    if cfg.retrieval == "hierarchical":  # Vo et al.: a balanced sample of the pool itself, no queries
        assigns, leaf_sim = hierarchical_kmeans(rows_f32(pool.x, kept), cfg)
        take = kept[hierarchical_sampling(assigns, leaf_sim, min(cfg.hkm_target, len(kept)), cfg, rng)]
        stats["retrieval"] = {pool.name: dict(method="hierarchical", retrieved=len(take),
                                              clusters_per_level=[int(a.max()) + 1 for a in assigns])}
        return [(take, "hkm-sampled", pool.name)]
    knn_index, pool_labels = None, None
    for src in curated:
        method = cfg.retrieval if cfg.retrieval != "auto" else (
            "sample" if len(src.x) >= cfg.sample_min_size else "cluster")
        if method == "sample":
            if knn_index is None:  # the index trained on the whole pool serves its kept part as well
                knn_index = fill_index(template or train_index(pool.x, kept, cfg), pool.x, kept, cfg)
            rows, st = sample_retrieval(knn_index, src.x, cfg, sample_k_of(src.name, cfg))
        else:
            if pool_labels is None:  # k-means sized to the pool (100,000 clusters for the paper's)
                n_clusters = int(np.clip(round(len(kept) / cfg.images_per_cluster), 1, cfg.max_clusters))
                sample = np.sort(rng.choice(kept, min(len(kept), 256 * n_clusters), replace=False))
                centroids = kmeans(rows_f32(pool.x, sample), n_clusters, cfg)
                pool_labels, _ = assign(pool.x, kept, centroids, cfg)
            query_labels, _ = assign(src.x, np.arange(len(src.x)), centroids, cfg)
            pos, st = cluster_retrieval(pool_labels, query_labels, n_clusters, cfg, rng)
            rows = kept[pos]
        stats.setdefault("retrieval", {})[src.name] = st
        out.append((rows, f"{method}-retrieved", src.name))
        print0(f"retrieval for {src.name}: {st}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Outputs: curated list, montage
# ---------------------------------------------------------------------------------------------------------------
def write_curated(path, curated, retrieved, pool):
    """TSV id / source / dataset: the curated images as they are, then retrieved pool images, each once."""
    listed, counts = np.zeros(len(pool.x), bool), {}
    with open(path, "w") as f:
        f.write("id\tsource\tdataset\n")
        for src in curated:
            f.writelines(f"{i}\tcurated\t{src.name}\n" for i in read_ids(src))
            counts["curated"] = counts.get("curated", 0) + len(src.x)
        for rows, source, name in retrieved:
            new = rows[~listed[rows]]  # retrieved for an earlier dataset: listed there
            listed[new] = True
            f.writelines(f"{i}\t{source}\t{name}\n" for i in read_ids(pool, new))
            counts[source] = counts.get(source, 0) + len(new)
    return counts


def images_of(src, rows, size=64):
    """PIL images of rows of a source: from its dataset, or from its ids when they are image paths."""
    if src.dataset is not None:  # [3,H,W] in [0,1] -> PIL
        images = [Image.fromarray(np.uint8(src.dataset[int(r)][0].permute(1, 2, 0).numpy() * 255)) for r in rows]
    else:
        images = [Image.open(p).convert("RGB") for p in read_ids(src, rows) if os.path.isfile(p)]
    return [im.resize((size, size)) for im in images]


def draw_examples(pool, roots, curated, retrieved, cfg, path, size=64):
    """montage.png: the largest duplicate groups (kept image first), then images of the first curated dataset
    with their nearest retrieved pool images. False when there are no images to draw."""
    rows, sizes = [], np.bincount(roots) if roots is not None else np.zeros(1, np.int64)
    for root in np.argsort(-sizes)[:cfg.montage_rows]:
        if sizes[root] > 1:
            rows.append((f"dup group of {sizes[root]}", images_of(pool, np.nonzero(roots == root)[0][:10])))
    for src, (got, source, _) in list(zip(curated, retrieved))[:1]:
        if source.endswith("-retrieved") and len(got):
            index = fill_index(faiss.IndexFlatIP(pool.x.shape[1]), pool.x, got, cfg)
            for q, I, _ in knn(index, src.x, np.arange(min(cfg.montage_rows, len(src.x))), cfg.sample_k, cfg):
                rows += [(f"query {i} -> {source}", images_of(src, [i]) + images_of(pool, r)) for i, r in zip(q, I)]
    rows = [(title, ims) for title, ims in rows if ims]
    if not rows:
        return False
    canvas = Image.new("RGB", (160 + size * max(len(ims) for _, ims in rows), size * len(rows)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)  # the size-10 default drops spaces
    for r, (title, ims) in enumerate(rows):
        draw.text((4, r * size + 4), title, fill="black", font=font)
        for c, im in enumerate(ims):
            canvas.paste(im, (160 + c * size, r * size))
    canvas.save(path)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def run(cmd, cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stats_path, status_path, roots_path = out / "stats.json", out / "pool_status.npy", out / "pool_roots.npy"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() and cmd != "run" else {}
    if not cfg.pool:
        sys.exit("--pool is required")
    # Two embeddings as in the paper: the copy detector's for deduplication (App. A.3), the retrieval backbone's
    # for retrieval (App. A.4); one file when both are the same backbone, or for precomputed .npy sources.
    copy_checkpoint = cfg.copy_checkpoint or cfg.checkpoint
    pool_copy = load_source(cfg.pool, cfg, copy_checkpoint) if cmd != "retrieve" else None
    pool = load_source(cfg.pool, cfg) if cmd != "dedup" else pool_copy
    curated = [load_source(s, cfg) for s in cfg.curated.split(",") if s]
    evals = [load_source(s, cfg, copy_checkpoint) for s in cfg.eval_sets.split(",") if s and cmd != "retrieve"]
    if cmd == "embed" or (dist_info()[0] > 0 and cmd == "retrieve"):  # ranks > 0: embedding, pool search
        return
    template, retrieved = None, []
    if cmd in ("dedup", "run"):
        result = dedup(pool_copy, evals, cfg, stats)
        if result is None:  # ranks > 0 after their slice of the pool search; the rest runs on rank 0
            return
        status, roots, template = result
        if copy_checkpoint != cfg.checkpoint and not cfg.pool.endswith(".npy"):
            template = None  # an index trained on the copy embeddings does not fit the retrieval ones
        np.save(status_path, status)
        np.save(roots_path, roots)  # the kept image of each pool image's duplicate group
        print0(f"dedup: {stats['self_dedup']} {stats.get('relative_dedup', '')}")
    if cmd in ("retrieve", "run"):  # before any dedup: retrieve from the whole pool
        status = np.load(status_path) if status_path.exists() else np.zeros(len(pool.x), np.int8)
        retrieved = retrieve(pool, status, curated, template, cfg, stats)
        stats["curated_list"] = write_curated(out / "curated.tsv", curated, retrieved, pool)
        print0(f"curated list -> {out / 'curated.tsv'}: {stats['curated_list']}")
    roots = np.load(roots_path) if roots_path.exists() else None
    if draw_examples(pool, roots, curated, retrieved, cfg, out / "montage.png"):
        print0(f"montage -> {out / 'montage.png'}")
    stats_path.write_text(json.dumps(stats, indent=1))


def main(argv=None):
    cmd, cfg = parse_config(sys.argv[1:] if argv is None else argv)
    print0(f"curate.py {cmd}: {dataclasses.asdict(cfg)}")
    try:
        run(cmd, cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
