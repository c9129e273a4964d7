"""CPU benchmark of curate.py's deduplication and k-means (the numbers quoted in the README).

Data: clustered synthetic embeddings (random vectors have no real neighbours and make any index look bad):
n_centers random directions, each image a noisy copy of its center (mean cosine ~0.45 inside a cluster), plus
planted near-duplicates (cosine 0.75-0.95 to an original). Recall = planted copies that end in their
original's component. Each stage runs in its own process so its peak memory (ru_maxrss) is its own.

Run:
    OMP_WAIT_POLICY=PASSIVE python bench_curate.py                    # all stages, ~4.5 min
    python bench_curate.py --stage ivfpq --n 1000000                  # one stage
Stages: ivfpq = full self-dedup of n embeddings with IVF-PQ (4096 lists, 32 x 8-bit codes, nprobe 16);
        exact = the same with IndexFlatIP at exact_n (all-vs-all costs ~(n/exact_n)^2 more at n: extrapolated);
        kmeans = faiss k-means of kmeans_n points into kmeans_k clusters, 20 iterations.

Measured (2 CPU cores shared with other jobs: wall ~= CPU seconds, i.e. about one core's worth):
    ivfpq 1M:   175.5 s wall, 171.5 CPU-s (train 53, add 27, search + exact rescoring 96, components < 0.1),
                peak RSS 1.74 GB, planted recall 99.48%, 3,696 natural pairs > 0.6 also merged
    exact 100k: 49.8 s (search), recall 100%; at 1M ~100 x the search: ~80 min on this share, ~40 min on 2 cores
    kmeans 200k -> 1,000, 20 iterations: 15.2 s, peak RSS 0.62 GB
"""
import dataclasses
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from curate import CurateConfig, fill_index, kmeans, knn_edges, self_dedup, train_index


@dataclass
class BenchConfig:
    stage: str = "all"  # all | ivfpq | exact | kmeans
    n: int = 1_000_000  # embeddings deduplicated with IVF-PQ
    exact_n: int = 100_000  # embeddings deduplicated exactly (1M all-vs-all is ~40-50 min on 2 cores)
    dim: int = 256  # embedding width
    per_center: int = 100  # images per synthetic cluster
    spread: float = 1.1  # noise norm around a center: mean in-cluster cosine 1 / (1 + spread^2) ~ 0.45
    dup_fraction: float = 0.05  # share of the n embeddings that are planted near-duplicate copies
    kmeans_n: int = 200_000
    kmeans_k: int = 1_000
    seed: int = 0


def parse_config(argv):
    values = {}
    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    for key, value in zip(argv[::2], argv[1::2]):
        key = key.removeprefix("--")
        if key not in fields:
            sys.exit(f"unknown field --{key}; fields: {', '.join(fields)}")
        values[key] = type(fields[key].default)(value)
    return BenchConfig(**values)


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


def main():
    cfg = parse_config(sys.argv[1:])
    if cfg.stage == "all":
        print(f"bench_curate: {dataclasses.asdict(cfg)}", flush=True)
        args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "stage"]
        args = sum([a.split("=", 1) for a in args], [])
        for stage in ("kmeans", "exact", "ivfpq"):
            subprocess.run([sys.executable, __file__, "--stage", stage] + args, check=True)
        n_ratio = (cfg.n / cfg.exact_n) ** 2
        print(f"exact all-vs-all search at n={cfg.n}: ~{n_ratio:.0f} x the exact stage's search time (extrapolated)")
        return
    if cfg.stage == "kmeans":
        result = kmeans_stage(cfg)
    else:
        result = dedup_stage(cfg.exact_n if cfg.stage == "exact" else cfg.n, cfg.stage == "exact", cfg)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
