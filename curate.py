"""The LVD-142M data pipeline of DINOv2 (Sec. 3, App. A): embed, deduplicate, retrieve -- with faiss, at any scale.

Uncurated pool + curated datasets -> an embedding of every image -> near-duplicates removed inside the pool ->
pool images close to evaluation sets removed -> pool images close to each curated dataset retrieved ->
curated.tsv (id, source, dataset), stats.json (every step), montage.png (duplicate groups, retrieved neighbours).
As in the paper, two embeddings: a copy detector's for deduplication (--copy_checkpoint: a checkpoint, or "copy"
for copydetect.py's SSCD stand-in) and the retrieval backbone's (--checkpoint). Deduplicating images without a
copy detector is refused: at SSCD's thresholds (0.6 / 0.45) a retrieval embedding chains look-alike images of
one class into one group; "--copy_checkpoint same" uses the retrieval embedding at thresholds given as flags.
A precomputed .npy source is used as it is, for deduplication and retrieval alike. embeddings.py embeds image
sources once, caches them in --out (under torchrun one folder every node sees; each rank embeds a slice) and
holds the faiss search; this file holds the method: deduplication, retrieval and the outputs.

Run (a source is an image folder, "fashion-mnist" / "fashion-mnist:test", or precomputed embeddings <name>.npy
with an optional <name>.ids.txt; every sub-command takes the CurateConfig fields as --field value):
    python curate.py run --preset tiny --pool fashion-mnist --curated fashion-mnist:test
    python curate.py embed --pool <folder> --checkpoint teacher_backbone.pth  # -> out/curate/emb_<name>_<key>.npy
    torchrun --nproc_per_node 8 curate.py embed ...  # each rank embeds a contiguous slice of the images
    python curate.py dedup --pool emb.npy --eval_sets a.npy,b.npy               # -> out/curate/pool_status.npy
    torchrun --nnodes 20 --nproc_per_node 1 ... curate.py dedup ...  # one process per node, index on its GPUs
    python curate.py retrieve --pool emb.npy --curated c.npy                    # -> out/curate/curated.tsv
    python bench_curate.py                           # the 1M-embedding CPU benchmark

Paper -> code
  Sec. 3, an embedding of every image ........................ embeddings.load_source, embeddings.embed
  App. A.3, a copy-detection embedding (SSCD) ................ copydetect.CopyDescriptor (tiny preset), refusal
  App. A.2, cosine similarity ................................ embeddings.rows_f32, faiss inner product
  Sec. 3 "Implementation details", faiss IVF-PQ on GPUs ...... embeddings.train_index, fill_index, knn, rescore
  App. A.3, self-deduplication (k = 64, > 0.6, components) ... pool_edges, connected_components, self_dedup
  App. A.3, relative deduplication (> 0.45, whole component) . relative_dedup
  App. A.4, sample-based retrieval (k nearest per image) ..... sample_retrieval, sample_k_of (32 for IN-1k)
  App. A.4, cluster-based retrieval (> 3 images, 10k, 1M) .... embeddings.kmeans, assign; cluster_retrieval
  Vo et al. 2024, hierarchical k-means, balanced sampling .... hierarchical_kmeans, balanced_split,
                                                               hierarchical_sampling

Shape legend: N pool images, Q queries, D embedding width, k neighbours, C clusters.
"""
import dataclasses
import json
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import faiss
import numpy as np
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import cli
from cli import at_least, in_range, one_of
from embeddings import (assign, fill_index, images_of, kmeans, knn, knn_edges, load_source, read_ids, rows_f32,
                        train_index)
from runtime import get_rank, print0, setup_distributed, teardown_distributed


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CurateConfig:
    # --- sources (comma-separated lists) and outputs
    pool: str = ""  # the uncurated source (Sec. 3: 1.2B web images)
    curated: str = ""  # curated datasets to retrieve for (Tab. 15: ImageNet-22k, ImageNet-1k, Landmarks, ...)
    eval_sets: str = ""  # evaluation sets to deduplicate against (App. A.3: train and test splits of benchmarks)
    out: str = "out/curate"  # output folder
    checkpoint: str = ""  # backbone for embeddings (paper: SSL ViT-H/16 on IN-22k); "pixels" = standardised pixels
    copy_checkpoint: str = ""  # dedup embedding (App. A.3: SSCD): a checkpoint, "copy" (copydetect.py), "same"
    image_size: int = 224  # embedding input resolution, px
    batch_size: int = 256  # images per embedding forward
    num_workers: int = 8  # DataLoader workers decoding images for the embedding
    # float16 halves the disk: 2.4 TB at 1.2B images x 1024 dimensions
    emb_dtype: str = "float16"  # dtype of the stored embeddings: float16 or float32
    embed_chunk: int = 65536  # images per extract_features call (bounds host memory)
    # --- deduplication (App. A.3)
    dedup_k: int = 64  # nearest neighbours searched per pool image
    dedup_threshold: float = 0.6  # cosine above which two pool images are duplicates
    relative_threshold: float = 0.45  # cosine above which a pool image duplicates an evaluation image
    # --- retrieval (App. A.4)
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
    # --- hierarchical k-means + balanced sampling (Vo et al. 2024: 4 levels, 10M/500k/50k/10k clusters)
    hkm_branching: str = "74,20,10,5"  # points per cluster at level 1, then centroids per cluster at each level
    hkm_resample: str = "1,10,5,3"  # r closest points per cluster refit in the resampling steps (<= 1: none)
    hkm_resample_steps: int = 10  # resampling-clustering steps per level
    hkm_target: int = 142_000_000  # images to sample (LVD-142M's size, for comparison)
    hkm_strategy: str = "c"  # inside a leaf cluster: c = closest to the centroid first, r = random
    hkm_iters: int = 50  # Lloyd iterations per level (ssl-data-curation's configs: 50)
    # --- faiss (Sec. 3 "Implementation details"; IVF-PQ settings are ours, bench_curate.py measures them)
    exact_max: int = 200_000  # pools up to this size use exact IndexFlatIP, larger ones IVF-PQ
    ivf_lists: int = 0  # inverted lists; 0 = the power of two nearest 4 sqrt(N) (4096 at 1M)
    ivf_train_per_list: int = 64  # coarse k-means training points per inverted list
    ivf_train_iters: int = 10  # Lloyd iterations of the coarse k-means
    pq_m: int = 32  # PQ sub-quantizers = bytes per code at 8 bits
    pq_bits: int = 8  # bits per sub-quantizer code
    nprobe: int = 16  # inverted lists visited per query
    refine: int = 10  # sample retrieval with PQ re-ranks refine x k candidates by exact cosine
    query_batch: int = 16384  # queries per search call (bounds memory: query_batch x k candidates)
    gpu: bool = True  # faiss GPU indexes and k-means when faiss sees GPUs
    seed: int = 0  # random seed of sampling and k-means
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


# tiny: Fashion-MNIST-sized pools on a laptop CPU without a trained model. Deduplication uses copydetect.py's
# descriptor at thresholds chosen on planted copies (`python bench_curate.py --stage copies`, README);
# retrieval uses standardised pixels, a stand-in for a trained backbone (--checkpoint teacher_backbone.pth).
PRESETS = {
    "tiny": dict(checkpoint="pixels", copy_checkpoint="copy", image_size=28, batch_size=512, num_workers=0,
                 images_per_cluster=1000, cluster_take=200, dataset_cap=5000, hkm_branching="20,10",
                 hkm_resample="1,4", hkm_resample_steps=3, hkm_target=5000, dedup_threshold=0.875,
                 relative_threshold=0.8),
}
COMMANDS = ("embed", "dedup", "retrieve", "run")


def parse_config(argv):
    """`<command> [--preset name] [--field value ...]` -> (command, CurateConfig), with cli.py's convention:
    --help lists every field; an unknown field, a bad value or a deduplication without a copy detector is a
    one-line error with exit status 2."""
    cfg, args = cli.parse_config(CurateConfig, argv, presets=PRESETS, prog="curate.py",
                                 positionals=[("command", "what to run", dict(choices=COMMANDS))],
                                 description=__doc__.split("\n\n")[0])
    problem = refusal(args.command, cfg, args.overrides)
    if problem:
        cli.error(problem, "curate.py")
    return args.command, cfg


def refusal(cmd, cfg, given):
    """Why cmd must not run with cfg (given: the fields set by flags), or None. Deduplicating images needs a
    copy-detection embedding: SSCD's thresholds on a retrieval embedding merge look-alike images of one
    class (App. A.3). A .npy source is an embedding already chosen by the user."""
    if not cfg.pool:
        return "--pool is required: an image folder, fashion-mnist[:test] or embeddings <name>.npy"
    images = [s for s in [cfg.pool, *cfg.eval_sets.split(",")] if s and not s.endswith(".npy")]
    if cmd not in ("dedup", "run") or not images:
        return None
    if not cfg.copy_checkpoint:
        return ("--copy_checkpoint: deduplication needs a copy detector (App. A.3): pass --copy_checkpoint "
                "<file> or copy (copydetect.py's descriptor), or same with --dedup_threshold and "
                "--relative_threshold chosen for the --checkpoint embedding")
    if cfg.copy_checkpoint == "same" and not {"dedup_threshold", "relative_threshold"} <= set(given):
        return ("--copy_checkpoint same: give --dedup_threshold and --relative_threshold chosen for the "
                f"--checkpoint embedding (the defaults {CurateConfig.dedup_threshold} / "
                f"{CurateConfig.relative_threshold} are SSCD's)")
    return None


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
    rank, world, _ = setup_distributed()
    lo, hi = len(pool.x) * rank // world, len(pool.x) * (rank + 1) // world
    probes = None if index.probes is None else (index.probes[0][lo:hi], index.probes[1][lo:hi])
    edges = knn_edges(index, pool.x, np.arange(lo, hi), cfg.dedup_k, threshold, cfg, skip_self=True, probes=probes)
    if world == 1:
        return edges
    np.savez(Path(cfg.out) / f"edges.rank{rank}.npz", *edges)
    dist.barrier()
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
    stats). With PQ, refine x k candidates are re-ranked by exact cosine, so the k kept are (nearly) the true
    top k."""
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
    Lloyd iterations, k-means++ seeds at every level (k passes over the level's points). -> (assignment per
    level, minus the squared distance of each point to its level-1 centroid: larger is closer)."""
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
            queries = np.arange(min(cfg.montage_rows, len(src.x)))
            for q, I, _ in knn(index, src.x, queries, cfg.sample_k, cfg):  # I [b,k] nearest retrieved rows
                rows += [(f"query {i} -> {source}", images_of(src, [i]) + images_of(pool, r))
                         for i, r in zip(q, I)]
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
    # Two embeddings as in the paper: the copy detector's for deduplication (App. A.3), the retrieval backbone's
    # for retrieval (App. A.4); one file for "same" or a precomputed .npy pool. parse_config refused the rest.
    copy = cfg.checkpoint if cfg.copy_checkpoint == "same" else cfg.copy_checkpoint
    deduplicating = cmd in ("dedup", "run")
    pool_copy = load_source(cfg.pool, cfg, copy) if deduplicating or (cmd == "embed" and copy) else None
    pool = load_source(cfg.pool, cfg) if cmd != "dedup" else pool_copy
    curated = [load_source(s, cfg) for s in cfg.curated.split(",") if s]
    evals = [load_source(s, cfg, copy) for s in cfg.eval_sets.split(",") if s and deduplicating]
    if cmd == "embed" or (get_rank() > 0 and cmd == "retrieve"):  # ranks > 0: embedding, pool search
        return
    template, retrieved = None, []
    if deduplicating:
        result = dedup(pool_copy, evals, cfg, stats)
        if result is None:  # ranks > 0 after their slice of the pool search; the rest runs on rank 0
            return
        status, roots, template = result
        if copy != cfg.checkpoint and not cfg.pool.endswith(".npy"):
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
    # Long collective timeout: ranks wait at barriers while rank 0 writes a billion ids or the slowest searches.
    setup_distributed(timeout=timedelta(hours=12))
    print0(f"curate.py {cmd}: {dataclasses.asdict(cfg)}")
    run(cmd, cfg)
    teardown_distributed()


if __name__ == "__main__":
    main()
