"""CPU benchmark of curate.py's deduplication and k-means (the README quotes its numbers beside these commands),
and a measurement of its copy detection on real images.

Data: clustered synthetic embeddings (random vectors have no real neighbours and make any index look bad):
n_centers random directions, each image a noisy copy of its center (mean cosine ~0.45 inside a cluster), plus
planted near-duplicates (cosine 0.75-0.95 to an original). Recall = planted copies that end in their
original's component. Each stage runs in its own process so its peak memory (ru_maxrss) is its own; each prints
one JSON line with wall and CPU seconds (CPU seconds are not inflated by other jobs on the machine).

Run:
    OMP_WAIT_POLICY=PASSIVE python bench_curate.py                    # all stages but copies
    python bench_curate.py --stage ivfpq --n 1000000                  # one stage
    python bench_curate.py --stage copies                             # copy detection on Fashion-MNIST
Stages: ivfpq = full self-dedup of n embeddings with IVF-PQ (4096 lists, 32 x 8-bit codes, nprobe 16), with the
        time of each part (train, add, search + exact rescoring, components) and how many pairs PQ scores put
        above 0.6 against exact cosine among the same candidates (why curate.py rescores);
        exact = the same with IndexFlatIP at exact_n (all-vs-all costs ~(n/exact_n)^2 more at n: extrapolated);
        kmeans = faiss k-means of kmeans_n points into kmeans_k clusters, 20 iterations;
        copies = (not in "all") `curate.py dedup --preset tiny` on a folder of copies_n distinct Fashion-MNIST
        test images plus copies_per_kind edited copies of them per edit kind (COPY_EDITS), and an evaluation
        folder of copies_eval other test images of which the pool holds one edited copy each: precision over
        merged pairs, recall per edit kind, share of the evaluation copies and of the rest removed. Its time
        includes learning copydetect.py's projection when --out holds none.

Paper -> code
  Sec. 3 "Implementation details", faiss at scale ..... dedup_stage (IVF-PQ or exact), kmeans_stage
  App. A.3, copy detection (SSCD's role) .............. copies_stage: plant_copies (COPY_EDITS), copy_metrics
"""
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import cli
import curate
from copydetect import crop_resize, jpeg, shift
from curate import CurateConfig, self_dedup
from data import FashionMNIST, build_dataset
from embeddings import fill_index, kmeans, knn_edges, train_index


@dataclass
class BenchConfig:
    stage: str = "all"  # all | ivfpq | exact | kmeans | copies (copies is not part of all)
    n: int = 1_000_000  # embeddings deduplicated with IVF-PQ
    exact_n: int = 100_000  # embeddings deduplicated exactly (all-vs-all: cost grows as exact_n^2)
    dim: int = 256  # embedding width
    per_center: int = 100  # images per synthetic cluster
    spread: float = 1.1  # noise norm around a center: mean in-cluster cosine 1 / (1 + spread^2) ~ 0.45
    dup_fraction: float = 0.05  # share of the n embeddings that are planted near-duplicate copies
    kmeans_n: int = 200_000  # points clustered in the kmeans stage
    kmeans_k: int = 1_000  # clusters of the kmeans stage
    copies_n: int = 8_000  # distinct Fashion-MNIST test images in the copies stage's pool
    copies_per_kind: int = 500  # planted copies per edit kind
    copies_eval: int = 1_000  # evaluation images, each with one edited copy planted in the pool
    copies_flags: str = ""  # extra curate.py flags for the copies stage, e.g. "--dedup_threshold 0.8"
    seed: int = 0  # random seed of the synthetic data and the planted copies

    def __post_init__(self):
        cli.one_of("stage", self.stage, ("all", "ivfpq", "exact", "kmeans", "copies"))
        for name in ("n", "exact_n", "dim", "per_center", "kmeans_n", "kmeans_k", "copies_n"):
            cli.at_least(name, getattr(self, name), 1)


def parse_config(argv):
    """Flags by cli.py's convention (--help lists them; a bad value is a one-line error, exit status 2)."""
    return cli.parse_config(BenchConfig, argv, prog="bench_curate.py", description=__doc__.split("\n\n")[0])[0]


def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def clustered_embeddings(n, cfg, chunk=1 << 17):
    """-> x float32 [n,D] (unit rows), planted (original, copy) row pairs; copies are the last rows."""
    rng = np.random.default_rng(cfg.seed)
    n_dup = int(n * cfg.dup_fraction)
    n_base = n - n_dup
    centers = unit(rng.standard_normal((max(1, n_base // cfg.per_center), cfg.dim), dtype=np.float32))
    x = np.empty((n, cfg.dim), np.float32)
    for s in range(0, n_base, chunk):  # chunked: never more than one chunk of noise in memory
        e = min(s + chunk, n_base)
        noise = unit(rng.standard_normal((e - s, cfg.dim), dtype=np.float32))
        x[s:e] = unit(centers[rng.integers(0, len(centers), e - s)] + cfg.spread * noise)
    originals = rng.choice(n_base, n_dup, replace=False)
    tau = rng.uniform(0.33, 0.88, (n_dup, 1)).astype(np.float32)  # cosine to the original in [0.75, 0.95]
    for s in range(0, n_dup, chunk):
        e = min(s + chunk, n_dup)
        noise = unit(rng.standard_normal((e - s, cfg.dim), dtype=np.float32))
        x[n_base + s:n_base + e] = unit(x[originals[s:e]] + tau[s:e] * noise)
    return x, np.stack([originals, np.arange(n_base, n)], axis=1)


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def cpu_seconds():
    """User + system CPU time of this process (all threads): unlike wall time, not inflated by other jobs."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def dedup_stage(n, exact, cfg):
    x, planted = clustered_embeddings(n, cfg)
    ccfg = CurateConfig(exact_max=n if exact else 0)
    times, t, cpu0 = {}, time.perf_counter(), cpu_seconds()
    rows = np.arange(n)
    template = train_index(x, rows, ccfg)
    times["train"] = time.perf_counter() - t
    index = fill_index(template, x, rows, ccfg, keep_probes=True)
    times["add"] = time.perf_counter() - t - sum(times.values())
    a, b, s = knn_edges(index, x, rows, ccfg.dedup_k, ccfg.dedup_threshold, ccfg, True, index.probes)
    times["search+rescore"] = time.perf_counter() - t - sum(times.values())
    roots = self_dedup(n, a, b, s, ccfg)
    times["components"] = time.perf_counter() - t - sum(times.values())
    total, cpu = time.perf_counter() - t, cpu_seconds() - cpu0
    found = roots[planted[:, 0]] == roots[planted[:, 1]]
    copies = np.zeros(n, bool)
    copies[planted[:, 1]] = True
    removed = roots != rows
    out = dict(stage="exact" if exact else "ivfpq", n=n, seconds=round(total, 1), cpu_seconds=round(cpu, 1),
               **{k: round(v, 1) for k, v in times.items()}, peak_rss_gb=round(peak_gb(), 2),
               planted_recall=round(float(found.mean()), 4), removed=int(removed.sum()),
               removed_not_planted=int((removed & ~copies).sum()), pairs_above_06=len(a))
    if not exact:  # how much PQ scores overstate similarity, on one batch of queries (why we rescore)
        q = np.ascontiguousarray(x[:ccfg.query_batch])
        D, I = index.index.search(q, ccfg.dedup_k + 1)  # PQ scores [b,k+1], self-matches excluded below
        _, _, s_exact = knn_edges(index, x, np.arange(len(q)), ccfg.dedup_k, 0.6, ccfg, skip_self=True)
        pq_pairs = int(((D > 0.6) & (I != np.arange(len(q))[:, None])).sum())
        out.update(pq_pairs_above_06=pq_pairs, exact_pairs_above_06=len(s_exact))
    return out


def kmeans_stage(cfg):
    x, _ = clustered_embeddings(cfg.kmeans_n, cfg)
    t, cpu0 = time.perf_counter(), cpu_seconds()
    centroids = kmeans(x, cfg.kmeans_k, CurateConfig(kmeans_iters=20))
    dt, cpu = time.perf_counter() - t, cpu_seconds() - cpu0
    sims = (x[:20000] @ centroids.T).max(axis=1)  # [20000] cosine to the nearest centroid
    return dict(stage="kmeans", n=cfg.kmeans_n, k=cfg.kmeans_k, iters=20, seconds=round(dt, 1),
                cpu_seconds=round(cpu, 1), peak_rss_gb=round(peak_gb(), 2),
                mean_cos_to_centroid=round(float(sims.mean()), 3))


# ---------------------------------------------------------------------------------------------------------------
# Copy detection on real images: planted edited copies of Fashion-MNIST test images (held out from
# copydetect.py's learning, which uses training images), each edit kind measured on its own
# ---------------------------------------------------------------------------------------------------------------
def photometric(img, rng):
    """One of: brightness x0.7-1.3 or +-0.15, contrast x0.7-1.3, Gaussian noise (sigma 0.02-0.05), JPEG."""
    kind = rng.integers(5)
    if kind == 4:
        return jpeg(img, rng.integers(40, 91))
    out = [img * rng.uniform(0.7, 1.3), img + rng.uniform(-0.15, 0.15),
           (img - img.mean()) * rng.uniform(0.7, 1.3) + img.mean(),
           img + rng.normal(0, rng.uniform(0.02, 0.05), img.shape)][kind]
    return np.clip(out, 0, 1)


def small_shift(rng):
    """(dy, dx) with the larger of |dy|, |dx| equal to 1 or 2 pixels."""
    while True:
        dy, dx = rng.integers(-2, 3, 2)
        if max(abs(dy), abs(dx)) >= 1:
            return dy, dx


COPY_EDITS = {  # grey [28,28] in [0,1] -> an edited copy; the first four are the photometric edits
    "brightness": lambda im, rng: np.clip(im * rng.uniform(0.7, 1.3) if rng.random() < 0.5 else
                                          im + rng.uniform(-0.15, 0.15), 0, 1),
    "contrast": lambda im, rng: np.clip((im - im.mean()) * rng.uniform(0.7, 1.3) + im.mean(), 0, 1),
    "noise": lambda im, rng: np.clip(im + rng.normal(0, rng.uniform(0.02, 0.05), im.shape), 0, 1),
    "jpeg": lambda im, rng: jpeg(im, rng.integers(40, 91)),
    "shift+photometric": lambda im, rng: photometric(shift(im, *small_shift(rng)), rng),
    "crop+rescale": lambda im, rng: crop_resize(im, *rng.integers(0, 3, 4)),  # 0-2 px off each side
}


def save_png(path, img):
    Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255 + 0.5)).save(path)


def plant_copies(folder, n_distinct, per_kind, n_eval, seed=0, root=None):
    """Writes folder/pool/<row>.png: n_distinct Fashion-MNIST test images, then per_kind edited copies per
    COPY_EDITS kind, then one edited copy (a random kind) of each of n_eval other test images, which go to
    folder/eval/. -> dict of [N] arrays over the pool rows: group (the image a row is a copy of; eval images
    count from n_distinct), kind (-1: distinct image, else the index into COPY_EDITS; for eval copies too).
    root: a folder of Fashion-MNIST's IDX files (default: data.py's copy, downloaded if needed)."""
    rng = np.random.default_rng(seed)
    test = FashionMNIST(root, train=False) if root else build_dataset("fashion-mnist", train=False)
    test = test.images.astype(np.float32) / 255  # [10000,28,28]
    assert n_distinct + n_eval <= len(test), "the test split has 10,000 images"
    pool, evals = Path(folder) / "pool", Path(folder) / "eval"
    pool.mkdir(parents=True), evals.mkdir(parents=True)
    images, group, kind = list(test[:n_distinct]), list(range(n_distinct)), [-1] * n_distinct
    for k, edit in enumerate(COPY_EDITS.values()):
        for i in rng.choice(n_distinct, per_kind, replace=False):
            images.append(edit(test[i], rng)), group.append(i), kind.append(k)
    for j in range(n_eval):
        k = rng.integers(len(COPY_EDITS))
        save_png(evals / f"{j:06d}.png", test[n_distinct + j])
        images.append(list(COPY_EDITS.values())[k](test[n_distinct + j], rng))
        group.append(n_distinct + j), kind.append(k)
    for row, img in enumerate(images):
        save_png(pool / f"{row:06d}.png", img)
    return dict(group=np.array(group), kind=np.array(kind), n_distinct=n_distinct)


def copy_metrics(out, planted):
    """Scores a `curate.py dedup` run in `out` against plant_copies' ground truth -> dict."""
    status, roots = np.load(Path(out) / "pool_status.npy"), np.load(Path(out) / "pool_roots.npy")
    group, kind, n = planted["group"], planted["kind"], planted["n_distinct"]
    sizes = np.bincount(roots)  # self-deduplication components
    merged_pairs = int((sizes * (sizes - 1) // 2).sum())
    _, per_group = np.unique(roots * (group.max() + 1) + group, return_counts=True)  # (component, group) cells
    true_pairs = int((per_group * (per_group - 1) // 2).sum())
    copies = np.arange(len(group)) >= n
    in_pool_copies = copies & (group < n)  # copies of pool images (not of evaluation images)
    recall = {name: round(float((roots[in_pool_copies & (kind == k)] == roots[group[in_pool_copies &
                                                                                     (kind == k)]]).mean()), 3)
              for k, name in enumerate(COPY_EDITS)}
    eval_copies = copies & (group >= n)
    return dict(pool=len(group), removed=int((status > 0).sum()), merged_pairs=merged_pairs,
                precision=round(true_pairs / max(merged_pairs, 1), 4), recall=recall,
                distinct_merged=int((np.bincount(roots[:n])[roots[:n]] > 1).sum()),  # with another distinct one
                eval_copies_removed=round(float((status[eval_copies] > 0).mean()), 3),
                others_relative_removed=round(float((status[~eval_copies] == 2).mean()), 4))


def copies_stage(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        planted = plant_copies(tmp, cfg.copies_n, cfg.copies_per_kind, cfg.copies_eval, cfg.seed)
        t = time.perf_counter()
        curate.main(["dedup", "--preset", "tiny", "--pool", f"{tmp}/pool", "--eval_sets", f"{tmp}/eval",
                     "--out", f"{tmp}/out", *cfg.copies_flags.split()])
        seconds = round(time.perf_counter() - t, 1)
        return dict(stage="copies", seconds=seconds, **copy_metrics(f"{tmp}/out", planted))


def main():
    cfg = parse_config(sys.argv[1:])
    if cfg.stage == "all":
        print(f"bench_curate: {dataclasses.asdict(cfg)}", flush=True)
        args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "stage"]
        args = sum([a.split("=", 1) for a in args], [])
        for stage in ("kmeans", "exact", "ivfpq"):
            subprocess.run([sys.executable, __file__, "--stage", stage] + args, check=True)
        n_ratio = (cfg.n / cfg.exact_n) ** 2
        print(f"exact all-vs-all search at n={cfg.n}: ~{n_ratio:.0f} x the exact stage's search time "
              f"(extrapolated)")
        return
    if cfg.stage == "kmeans":
        result = kmeans_stage(cfg)
    elif cfg.stage == "copies":
        result = copies_stage(cfg)
    else:
        result = dedup_stage(cfg.exact_n if cfg.stage == "exact" else cfg.n, cfg.stage == "exact", cfg)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
