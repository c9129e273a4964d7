"""Embedding files and faiss search for curation (Sec. 3, App. A): what curate.py's steps stand on.

Embedding files: every image of a source embedded once by a backbone ("pixels": standardised grey pixels, a
stand-in; "copy": copydetect.py's copy-detection descriptor; or any checkpoint model.load_model reads) into
<out>/emb_<name>_<key>.npy ([N,D] L2-normalised rows, float16 or float32), an ids file emb_<name>_<key>.ids.txt (one
id per row: the image path, or "<name>:<row>") and a .json manifest of what the file depends on (source path,
backbone, image size, image count). <key> hashes the manifest, so another folder of the same name, another
backbone, size or image count never reuses a file. Under torchrun every rank writes a contiguous, page-aligned
slice of rows of one memory-mapped file, so --out must be one folder that every node sees; a file is renamed into
place only when complete. A precomputed <name>.npy source (with an optional <name>.ids.txt) is read as it is.

faiss search: k-means (spherical for retrieval and the inverted lists, L2 with k-means++ seeds for hierarchical
k-means), an exact IndexFlatIP for small pools or IVF-PQ for large ones (the database sharded over the GPUs when
faiss sees any), and k-NN search whose candidates are rescored by exact cosine read back from the embedding file.

Every function's cfg is curate.py's CurateConfig (not imported: imports go curate -> embeddings -> copydetect);
each function reads the fields it names. No entry point: `python curate.py embed ...` runs load_source.

Paper -> code
  Sec. 3, "we first compute an image embedding" ..... load_source (cache keyed by cache_key), embed,
                                                      build_backbone; read_ids, images_of
  App. A.3, a copy-detection embedding (SSCD) ....... build_backbone("copy") -> copydetect.load_copy_descriptor
  Sec. 3, embedding on many GPUs (torchrun) ......... embed: open_aligned_npy, row_slice (one file, every rank)
  App. A.2, cosine similarity ....................... rows_f32 (rows normalised on read), faiss inner product
  App. A.4, k-means clusters of the pool ............ kmeans, assign
  Sec. 3 "Implementation details", faiss on GPUs .... train_index (IVF-PQ), fill_index, knn, rescore, knn_edges

Shape legend: N rows of an embedding file, D embedding width, Q queries, k neighbours, C clusters.
"""
import hashlib
import json
import math
import os
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
from faiss.contrib import ivf_tools
from PIL import Image
from torch.utils.data import Subset

import cli
from copydetect import VERSION, load_copy_descriptor
from data import build_dataset, extract_features
from losses import is_dist
from model import load_model
from runtime import get_rank, print0, progress, setup_distributed


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
    ivfpq stage counts the first), so no threshold or ranking ever uses them. Memory-bound: chunks run in
    threads (numpy releases the GIL in gathers and matmuls)."""
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
