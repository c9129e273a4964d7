"""Tests of curate.py: planted structure in synthetic embeddings, then real Fashion-MNIST images with planted
edited copies, the command line, the embedding cache.

Run: python -m pytest -q tests/test_curate.py -s     (-s shows the precision / recall / purity printed)
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import curate
import embeddings
from bench_curate import copy_metrics, plant_copies
from curate import (CurateConfig, balanced_split, cluster_retrieval, connected_components, dedup,
                    hierarchical_kmeans, hierarchical_sampling, sample_retrieval)
from embeddings import Source, fill_index, train_index


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def ivfpq(**kw):  # forces IVF-PQ on small pools: 32 lists, half of them probed
    return CurateConfig(exact_max=0, ivf_lists=32, nprobe=16, **kw)


def planted_pool(rng, n_base=3000, d=256, n_clusters=60, n_groups=100, spread=2.5):
    """Clustered pool (mean in-cluster cosine 1 / (1 + spread^2) ~ 0.14, so no natural pair reaches 0.45) with
    n_groups planted near-duplicate groups of 2-5 images (copies at cosine >= 0.85 to the group's original),
    shuffled. -> x [N,D], group id per image (-1: not planted), cluster centers, base labels."""
    centers = unit(rng.standard_normal((n_clusters, d)))
    labels = rng.integers(0, n_clusters, n_base)
    x = [unit(centers[labels] + spread * unit(rng.standard_normal((n_base, d))))]
    originals = rng.choice(n_base, n_groups, replace=False)
    group = [np.full(n_base, -1)]
    group[0][originals] = np.arange(n_groups)
    for g, o in enumerate(originals):
        n_copies = rng.integers(1, 5)
        noise = rng.uniform(0.2, 0.6, (n_copies, 1)) * unit(rng.standard_normal((n_copies, d)))
        x.append(unit(x[0][o] + noise))
        group.append(np.full(n_copies, g))
    x, group = np.concatenate(x), np.concatenate(group)
    perm = rng.permutation(len(x))
    return x[perm], group[perm], centers


def max_natural_cosine(x, group):
    """Highest cosine between two images that are not in the same planted group (precondition of the tests)."""
    s = x @ x.T  # [N,N]
    same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    np.fill_diagonal(same, True)
    return s[~same].max()


# ---------------------------------------------------------------------------------------------------------------
# Union-find
# ---------------------------------------------------------------------------------------------------------------
def reference_components(n, a, b):
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a, b):
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def test_connected_components_match_a_plain_union_find():
    rng = np.random.default_rng(0)
    for n, m in [(1, 0), (50, 0), (1000, 700), (1000, 3000)]:
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        roots = connected_components(n, a, b)
        np.testing.assert_array_equal(roots, reference_components(n, a, b))
    chain = np.arange(9999)  # a path given in reverse order: the worst case for naive label propagation
    np.testing.assert_array_equal(connected_components(10000, chain[::-1] + 1, chain[::-1]), np.zeros(10000))


# ---------------------------------------------------------------------------------------------------------------
# Deduplication on planted structure
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CurateConfig(), ivfpq()], ids=["flat", "ivfpq"])
def test_self_dedup_collapses_each_planted_group_and_nothing_else(cfg):
    rng = np.random.default_rng(0)
    x, group, _ = planted_pool(rng)
    assert max_natural_cosine(x, group) < cfg.relative_threshold  # the data has no natural duplicates
    stats = {}
    status, roots, _ = dedup(Source("pool", x, None, None), [], cfg, stats)
    kept = status == 0
    assert kept[group < 0].all()  # nothing outside the planted groups is removed
    per_group = np.bincount(group[group >= 0], weights=kept[group >= 0], minlength=group.max() + 1)
    np.testing.assert_array_equal(per_group, 1)  # every group collapses to exactly one image
    assert stats["self_dedup"]["removed"] == (group >= 0).sum() - (group.max() + 1)
    assert stats["self_dedup"]["index"] == ("flat" if cfg.exact_max else "ivfpq")


def orthogonal_mix(rng, a, cos, avoid=()):
    """Unit vector at exactly cosine `cos` from unit vector a (and orthogonal to the `avoid` directions)."""
    u = rng.standard_normal(a.shape)
    for v in (a, *avoid):
        u -= (u @ v) * v / (v @ v)
    return (cos * a + np.sqrt(1 - cos ** 2) * u / np.linalg.norm(u)).astype(np.float32)


@pytest.mark.parametrize("cfg", [CurateConfig(), ivfpq()], ids=["flat", "ivfpq"])
def test_relative_dedup_removes_eval_copies_with_their_components(cfg):
    rng = np.random.default_rng(1)
    x, group, _ = planted_pool(rng)
    singles = rng.choice(np.nonzero(group < 0)[0], 20, replace=False)
    # Chains: pool image A (touched by an eval image E at 0.7) links to a new pool image B at 0.52 (> 0.45, < 0.6),
    # while cos(E, B) = 0.7 * 0.52 = 0.36: B goes only because its component touches the evaluation set.
    chain_b, evals = [], []
    for i in singles:
        b = orthogonal_mix(rng, x[i], 0.52)
        chain_b.append(b)
        evals.append(orthogonal_mix(rng, x[i], 0.7, avoid=[b - 0.52 * x[i]]))
    touched_groups = rng.choice(group.max() + 1, 5, replace=False)  # eval copies of a planted copy: whole group
    for g in touched_groups:
        member = np.nonzero(group == g)[0][-1]
        evals.append(orthogonal_mix(rng, x[member], 0.7))
    pool_x = np.concatenate([x, np.stack(chain_b)])
    b_rows = np.arange(len(x), len(pool_x))
    stats = {}
    status, _, _ = dedup(Source("pool", pool_x, None, None), [Source("eval", np.stack(evals), None, None)], cfg,
                         stats)
    expected = np.zeros(len(pool_x), bool)
    expected[singles] = expected[b_rows] = True
    expected[:len(x)] |= np.isin(group, touched_groups)
    relative = status == 2
    np.testing.assert_array_equal(relative, expected & (status != 1))
    assert (status[b_rows] == 2).all() and (status[singles] == 2).all()
    assert all((status[:len(x)][group == g] > 0).all() for g in touched_groups)  # no touched group survives
    assert stats["relative_dedup"]["eval"]["removed"] == relative.sum()


# ---------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CurateConfig(), ivfpq()], ids=["flat", "ivfpq"])
def test_sample_retrieval_returns_the_true_nearest_neighbours(cfg):
    rng = np.random.default_rng(2)
    x, _, centers = planted_pool(rng, n_groups=0, spread=1.0)  # in-cluster cosine ~0.5
    q = unit(centers[rng.integers(0, len(centers), 60)] + unit(rng.standard_normal((60, x.shape[1]))))
    rows = np.arange(len(x))
    index = fill_index(train_index(x, rows, cfg), x, rows, cfg)
    got, stats = sample_retrieval(index, q, cfg)
    true_nn = np.argsort(-(q @ x.T), axis=1)[:, :cfg.sample_k]  # brute force [Q,k]
    expected = np.unique(true_nn)
    if cfg.exact_max:
        np.testing.assert_array_equal(got, expected)
    else:  # IVF-PQ is approximate: exact re-ranking of refine x k PQ candidates recovers nearly all
        recall = np.isin(expected, got).mean()
        print(f"IVF-PQ sample retrieval: recall of the true {cfg.sample_k}-NN {recall:.3f}")
        assert recall >= 0.95
    assert stats["retrieved"] == len(got) and stats["collisions"] == 60 * cfg.sample_k - len(got)


def test_cluster_retrieval_obeys_the_more_than_3_rule_and_the_caps():
    rng = np.random.default_rng(3)
    n_clusters = 8
    pool_labels = rng.integers(0, n_clusters, 4000)
    query_counts = np.array([0, 3, 4, 10, 1, 30, 3, 5])  # eligible (> 3): clusters 2, 3, 5, 7
    query_labels = np.repeat(np.arange(n_clusters), query_counts)
    cfg = CurateConfig(cluster_take=100)
    take, stats = cluster_retrieval(pool_labels, query_labels, n_clusters, cfg, rng)
    per_cluster = np.bincount(pool_labels[take], minlength=n_clusters)
    np.testing.assert_array_equal(per_cluster, np.where(query_counts > 3, 100, 0))
    assert len(np.unique(take)) == len(take) == stats["retrieved"] == 400 and stats["clusters_retrieved"] == 4
    cfg = CurateConfig(cluster_take=100, dataset_cap=250)  # the per-dataset cap
    take, stats = cluster_retrieval(pool_labels, query_labels, n_clusters, cfg, rng)
    per_cluster = np.bincount(pool_labels[take], minlength=n_clusters)
    assert len(take) == 250 and stats["capped"] and per_cluster.max() <= 100
    assert per_cluster[query_counts <= 3].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# Hierarchical k-means and balanced sampling (Vo et al. 2024)
# ---------------------------------------------------------------------------------------------------------------
def test_balanced_split():
    rng = np.random.default_rng(0)
    sizes = [2000, 500, 200, 100, 50]
    np.testing.assert_array_equal(balanced_split(sizes, 250, rng), [50] * 5)
    out = balanced_split(sizes, 1001, rng)  # t = 325: 2 x 325 + 200 + 100 + 50 = 1000, one more from a big one
    assert out.sum() == 1001 and sorted(out[:2]) == [325, 326] and list(out[2:]) == [200, 100, 50]
    np.testing.assert_array_equal(balanced_split(sizes, 10 ** 6, rng), sizes)


def test_hierarchical_sampling_is_balanced_at_every_level():
    rng = np.random.default_rng(4)
    sizes = np.array([2000, 500, 200, 100, 50])  # 5 concepts (top clusters), each split into leaves of 10 points
    leaf_of_point = np.arange(sizes.sum()) // 10  # [N] level-1 assignment
    concept_of_leaf = np.repeat(np.arange(5), sizes // 10)  # [285] level-2 assignment
    cfg = CurateConfig(hkm_strategy="r")
    picked = hierarchical_sampling([leaf_of_point, concept_of_leaf], rng.random(sizes.sum()), 250, cfg, rng)
    concept = concept_of_leaf[leaf_of_point]
    assert len(np.unique(picked)) == 250
    np.testing.assert_array_equal(np.bincount(concept[picked]), [50] * 5)  # uniform sampling: 175, 44, 18, 9, 4
    per_leaf = np.bincount(leaf_of_point[picked], minlength=285)
    for c in range(5):  # inside a concept the 50 are spread evenly over its leaves
        leaves = per_leaf[concept_of_leaf == c]
        assert leaves.max() - leaves.min() <= 1 or leaves.min() == 10


def test_hierarchical_kmeans_builds_pure_levels_and_a_balanced_sample():
    rng = np.random.default_rng(4)
    sizes, d = [2000, 500, 200, 100, 50], 32
    centers = unit(rng.standard_normal((5, d)))
    concept = np.repeat(np.arange(5), sizes)
    x = unit(centers[concept] + 0.5 * unit(rng.standard_normal((len(concept), d))))
    cfg = CurateConfig(hkm_branching="10,57", hkm_resample="1,3", hkm_resample_steps=3, hkm_strategy="r")
    assigns, leaf_sim = hierarchical_kmeans(x, cfg)
    assert [a.max() + 1 for a in assigns] == [285, 5]
    leaf_purity = np.mean([np.bincount(concept[assigns[0] == c]).max() / (assigns[0] == c).sum()
                           for c in range(285) if (assigns[0] == c).any()])
    assert leaf_purity == 1.0  # level 1 never mixes concepts
    picked = hierarchical_sampling(assigns, leaf_sim, 250, cfg, rng)
    counts = np.bincount(concept[picked], minlength=5)
    print(f"hierarchical k-means + sampling of 250 from concepts of sizes {sizes}: {counts.tolist()} "
          f"(uniform sampling: {[round(250 * s / sum(sizes)) for s in sizes]})")
    # k-means on unbalanced masses may still split the big concept at the top level (Vo et al. use 4 levels):
    # a loose bound, far from uniform sampling's 70% share for the largest concept.
    assert len(np.unique(picked)) == 250 and counts.max() <= 0.45 * 250 and counts.min() >= 1


# ---------------------------------------------------------------------------------------------------------------
# Real images: planted edited copies of Fashion-MNIST, found by the copy descriptor through the command line
# ---------------------------------------------------------------------------------------------------------------
def test_fashion_mnist_copies_found_per_edit_kind_and_only_real_ones(fashion_mnist_dir, tmp_path):
    """2,000 distinct test images + 300 copies per edit kind + 200 evaluation images with a copy each in the pool,
    through `curate.py dedup --preset tiny` (bench_curate.py --stage copies is the same at 8,000 images). -s prints
    the measured values; crop + rescale has no target, so it is not asserted. The same measurement:
    `python bench_curate.py --stage copies --copies_n 2000 --copies_per_kind 300 --copies_eval 200`."""
    planted = plant_copies(tmp_path, 2000, 300, 200, root=str(fashion_mnist_dir))
    curate.main(["dedup", "--preset", "tiny", "--pool", str(tmp_path / "pool"), "--eval_sets",
                 str(tmp_path / "eval"), "--out", str(tmp_path / "out")])
    m = copy_metrics(tmp_path / "out", planted)
    print(f"copies through the CLI: {m}")
    assert m["precision"] >= 0.95 and m["distinct_merged"] <= 0.01 * 2000  # distinct garments stay apart
    assert min(m["recall"][k] for k in ("brightness", "contrast", "noise", "jpeg")) >= 0.9
    assert m["recall"]["shift+photometric"] >= 0.75
    assert m["eval_copies_removed"] >= 0.9 and m["others_relative_removed"] <= 0.01


# ---------------------------------------------------------------------------------------------------------------
# Command line, end to end on an image folder and on precomputed embeddings
# ---------------------------------------------------------------------------------------------------------------
def write_pngs(folder, images, labels, start=0):
    paths = []
    for i, (im, y) in enumerate(zip(images, labels)):
        path = folder / f"class{y}" / f"{start + i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(path)
        paths.append(str(path))
    return paths


def embedding_file(out, name, checkpoint):
    """The embedding file of source `name` made with `checkpoint` ("pixels", "copy"), found by its manifest."""
    found = [p.with_suffix(".npy") for p in Path(out).glob(f"emb_{name}_*.json")
             if json.loads(p.read_text())["checkpoint"].split()[0] == checkpoint]
    assert len(found) == 1, found
    return found[0]


def test_cli_run_on_image_folders(fashion_mnist_dir, tmp_path):
    from data import FashionMNIST
    data = FashionMNIST(str(fashion_mnist_dir), train=False)
    imgs, labels = data.images[:160], data.labels[:160]
    write_pngs(tmp_path / "pool", imgs[:120], labels[:120])
    dup_paths = write_pngs(tmp_path / "pool", imgs[:10], labels[:10], start=1000)  # exact copies: duplicates
    write_pngs(tmp_path / "eval", imgs[20:25], labels[20:25])  # the eval set holds 5 pool images
    write_pngs(tmp_path / "curated", imgs[120:160], labels[120:160])
    out = tmp_path / "out"
    curate.main(["run", "--preset", "tiny", "--pool", str(tmp_path / "pool"), "--curated",
                 str(tmp_path / "curated"),
                 "--eval_sets", str(tmp_path / "eval"), "--out", str(out), "--retrieval", "sample"])
    ids = embedding_file(out, "pool", "pixels").with_suffix(".ids.txt").read_text().split()
    status = np.load(out / "pool_status.npy")
    assert all(status[ids.index(p)] == 1 for p in dup_paths)  # copies removed, originals (smaller index) kept
    stats = json.loads((out / "stats.json").read_text())
    assert stats["relative_dedup"]["eval"]["removed"] >= 5
    lines = (out / "curated.tsv").read_text().splitlines()
    assert lines[0] == "id\tsource\tdataset" and sum(line.split("\t")[1] == "curated" for line in lines) == 40
    retrieved = [line.split("\t")[0] for line in lines if "sample-retrieved" in line]
    assert retrieved and all(status[ids.index(p)] == 0 for p in retrieved)
    assert Image.open(out / "montage.png").size[0] > 160
    # The same pool as precomputed embeddings: retrieve with clusters, then the hierarchical alternative.
    emb = np.load(embedding_file(out, "pool", "pixels")).astype(np.float32)  # the retrieval embedding
    np.save(tmp_path / "pool.npy", emb * 3.0)  # unnormalised on purpose: rows are normalised on read
    np.save(tmp_path / "cur.npy", emb[:30])
    for method in ("cluster", "hierarchical"):
        curate.main(["retrieve", "--preset", "tiny", "--pool", str(tmp_path / "pool.npy"), "--curated",
                     str(tmp_path / "cur.npy"), "--out", str(tmp_path / method), "--retrieval", method,
                     "--images_per_cluster", "40", "--hkm_branching", "5,4", "--hkm_target", "50"])
        stats = json.loads((tmp_path / method / "stats.json").read_text())
        rows = [line.split("\t") for line in (tmp_path / method / "curated.tsv").read_text().splitlines()[1:]]
        assert sum(r[1] == "curated" for r in rows) == 30
        retrieved = [r[0] for r in rows if r[1] != "curated"]
        assert retrieved and all(i.startswith("pool:") for i in retrieved)  # no ids file: ids are <name>:<row>
        print(method, stats["retrieval"])
    assert stats["retrieval"]["pool"]["retrieved"] == 50


def test_embed_sharded_over_two_torchrun_ranks_matches_one_process(fashion_mnist_dir, tmp_path):
    from data import FashionMNIST
    data = FashionMNIST(str(fashion_mnist_dir), train=False)
    write_pngs(tmp_path / "imgs", data.images[:301], data.labels[:301])  # slices of 128 rows (whole pages), 45
    args = ["embed", "--preset", "tiny", "--pool", str(tmp_path / "imgs")]
    curate.main(args + ["--out", str(tmp_path / "one")])
    (tmp_path / "two").mkdir()
    for learned in (tmp_path / "one").glob("copy_descriptor_*.npz"):  # the ranks need not learn it again
        shutil.copy(learned, tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", curate.__file__, *args,
                    "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    for checkpoint, width in (("pixels", 784), ("copy", 400)):
        one, two = (embedding_file(tmp_path / d, "imgs", checkpoint) for d in ("one", "two"))
        assert one.name == two.name and np.load(one).shape == (301, width)
        # within one float16 step of the largest values (|x| < 0.5): the ranks' matmuls run on other shapes and
        # threads, which some BLAS kernels (MKL on AVX512) round differently; a misplaced row is off by far more
        np.testing.assert_allclose(np.load(one).astype(np.float32), np.load(two), rtol=0, atol=2 ** -12)
        assert one.with_suffix(".ids.txt").read_text() == two.with_suffix(".ids.txt").read_text()


def test_dedup_search_sharded_over_two_torchrun_ranks_matches_one_process(tmp_path):
    x, _, _ = planted_pool(np.random.default_rng(5), n_base=2000)
    np.save(tmp_path / "pool.npy", x)
    args = ["dedup", "--pool", str(tmp_path / "pool.npy"), "--exact_max", "0", "--ivf_lists", "32", "--gpu", "0"]
    curate.main(args + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", curate.__file__, *args,
                    "--out", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    one, two = np.load(tmp_path / "one" / "pool_status.npy"), np.load(tmp_path / "two" / "pool_status.npy")
    assert (one == 1).sum() > 100 and np.array_equal(one, two)
    stats = [json.loads((tmp_path / d / "stats.json").read_text())["self_dedup"] for d in ("one", "two")]
    assert stats[0] == stats[1] and stats[0]["index"] == "ivfpq"


def test_cli_rejects_unknown_fields():
    with pytest.raises(SystemExit):
        curate.parse_config(["run", "--dedup_treshold", "0.5"])
    cmd, cfg = curate.parse_config(["dedup", "--preset", "tiny", "--pool", "p", "--dedup_k", "8",
                                    "--gpu", "false"])
    assert cmd == "dedup" and cfg.dedup_k == 8 and cfg.gpu is False and cfg.checkpoint == "pixels"
    assert CurateConfig().dedup_k == 64 and CurateConfig().dedup_threshold == 0.6  # paper defaults (App. A.3)


# ---------------------------------------------------------------------------------------------------------------
# Embedding cache, page-aligned embedding files, and the smaller guards
# ---------------------------------------------------------------------------------------------------------------
def test_embedding_cache_is_keyed_by_source_backbone_size_and_count(fashion_mnist_dir, tmp_path):
    from data import FashionMNIST
    data = FashionMNIST(str(fashion_mnist_dir), train=False)
    write_pngs(tmp_path / "a" / "imgs", data.images[:40], data.labels[:40])
    write_pngs(tmp_path / "b" / "imgs", data.images[40:70], data.labels[40:70])  # the same folder name
    cfg = CurateConfig(**{**curate.PRESETS["tiny"], "out": str(tmp_path / "out")})
    a, b = (embeddings.load_source(str(tmp_path / d / "imgs"), cfg) for d in "ab")
    assert a.x.filename != b.x.filename and len(a.x) == 40 and len(b.x) == 30
    stamp = os.stat(a.x.filename).st_mtime_ns
    assert embeddings.load_source(str(tmp_path / "a" / "imgs"), cfg).x.filename == a.x.filename  # reused as it is
    assert os.stat(a.x.filename).st_mtime_ns == stamp
    small = embeddings.load_source(str(tmp_path / "a" / "imgs"), dataclasses.replace(cfg, image_size=14))
    copy = embeddings.load_source(str(tmp_path / "a" / "imgs"), cfg, "copy")
    assert small.x.shape == (40, 196) and copy.x.shape == (40, 400)  # another size, another backbone: new files
    write_pngs(tmp_path / "a" / "imgs", data.images[70:75], data.labels[70:75], start=100)
    assert len(embeddings.load_source(str(tmp_path / "a" / "imgs"), cfg).x) == 45  # more images: embedded again
    manifest = json.loads(Path(a.x.filename).with_suffix(".json").read_text())
    assert manifest == dict(source=str(tmp_path / "a" / "imgs"), checkpoint="pixels", image_size=28, count=40)


def test_a_crashed_embed_is_never_reused(fashion_mnist_dir, tmp_path, monkeypatch):
    from data import FashionMNIST
    data = FashionMNIST(str(fashion_mnist_dir), train=False)
    write_pngs(tmp_path / "imgs", data.images[:30], data.labels[:30])
    cfg = CurateConfig(**{**curate.PRESETS["tiny"], "out": str(tmp_path / "out"), "embed_chunk": 10})
    real, calls = embeddings.extract_features, []

    def crash_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(embeddings, "extract_features", crash_on_second_chunk)
    with pytest.raises(RuntimeError):
        embeddings.load_source(str(tmp_path / "imgs"), cfg)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(left) == 1 and left[0].endswith(".tmp.npy")  # no file under the final name, no manifest
    monkeypatch.setattr(embeddings, "extract_features", real)
    src = embeddings.load_source(str(tmp_path / "imgs"), cfg)
    assert np.linalg.norm(src.x.astype(np.float32), axis=1).min() > 0.99  # embedded again: no zero rows


def test_embedding_files_split_between_ranks_on_page_boundaries(tmp_path):
    for width, n, world in [(784, 301, 2), (400, 1001, 3), (1024, 10 ** 6, 8)]:
        row_bytes = 2 * width  # float16
        bounds = [embeddings.row_slice(n, row_bytes, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
        assert all((embeddings.PAGE + lo * row_bytes) % embeddings.PAGE == 0 for lo, _ in bounds)
    x = embeddings.open_aligned_npy(tmp_path / "e.npy", (301, 784), "float16")
    x[:] = 1
    x.flush()
    assert x.offset == embeddings.PAGE and np.load(tmp_path / "e.npy").astype(np.float32).sum() == 301 * 784


def test_ivfpq_on_a_width_that_pq_m_does_not_divide(capsys):
    x, group, _ = planted_pool(np.random.default_rng(6), n_base=1500, d=784)  # the tiny preset's pixel width
    stats = {}
    status, _, _ = dedup(Source("pool", x, None, None), [], ivfpq(), stats)
    assert stats["self_dedup"]["index"] == "ivfpq" and "28 sub-quantizers" in capsys.readouterr().out
    assert (status[group < 0] == 0).all() and (status == 1).sum() > 100


def test_eval_set_of_another_width_fails_before_the_pool_search(monkeypatch):
    monkeypatch.setattr(curate, "pool_edges", lambda *args: pytest.fail("the pool was searched first"))
    rng = np.random.default_rng(7)
    pool, ev = Source("pool", unit(rng.standard_normal((100, 256))), None, None), \
        Source("ev", unit(rng.standard_normal((10, 128))), None, None)
    with pytest.raises(SystemExit, match="ev has 128-d embeddings but the pool pool has 256-d"):
        dedup(pool, [ev], CurateConfig(), {})


def test_sample_k_per_curated_set():
    cfg = CurateConfig(sample_k_sets="imagenet-1k:32,landmarks:8")
    assert [curate.sample_k_of(name, cfg) for name in ("imagenet-1k", "landmarks", "other")] == [32, 8, 4]


def test_cli_convention_help_and_one_line_errors():
    """curate.py follows cli.py: --help exits 0 and lists the fields; a bad value is one line, exit status 2."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    helped = subprocess.run([sys.executable, "curate.py", "--help"], cwd=root, capture_output=True, text=True)
    assert helped.returncode == 0 and "--dedup_k" in helped.stdout and "nearest neighbours" in helped.stdout
    bad = subprocess.run([sys.executable, "curate.py", "dedup", "--dedup_k", "abc"], cwd=root, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("curate.py: error:")
    assert "--dedup_k" in bad.stderr and "Traceback" not in bad.stderr
    bench = subprocess.run([sys.executable, "bench_curate.py", "--help"], cwd=root, capture_output=True, text=True)
    assert bench.returncode == 0 and "--copies_flags" in bench.stdout  # help, not a 1M-embedding benchmark


NO_COPY_DETECTOR = ("curate.py: error: --copy_checkpoint: deduplication needs a copy detector (App. A.3): "
                    "pass --copy_checkpoint <file> or copy (copydetect.py's descriptor), or same with "
                    "--dedup_threshold and --relative_threshold chosen for the --checkpoint embedding")
SAME_NEEDS_THRESHOLDS = ("curate.py: error: --copy_checkpoint same: give --dedup_threshold and "
                         "--relative_threshold chosen for the --checkpoint embedding (the defaults 0.6 / 0.45 "
                         "are SSCD's)")


def test_dedup_of_images_without_a_copy_detector_is_refused_in_one_line():
    """SSCD's thresholds on the retrieval embedding would chain look-alike images of one class into one group:
    `curate.py dedup` on images without --copy_checkpoint stops before any work, one line, exit status 2."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    refused = subprocess.run([sys.executable, "curate.py", "dedup", "--pool", "fashion-mnist", "--checkpoint",
                              "pixels"], cwd=root, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [NO_COPY_DETECTOR]
    assert refused.stdout == ""  # nothing embedded, not even the config printed


@pytest.mark.parametrize("argv, message", [
    (["run", "--pool", "imgs", "--checkpoint", "pixels"], NO_COPY_DETECTOR),
    (["dedup", "--preset", "tiny", "--pool", "p.npy", "--eval_sets", "imgs", "--copy_checkpoint", ""],
     NO_COPY_DETECTOR),  # an evaluation set of images would be embedded for deduplication too
    (["run", "--preset", "tiny", "--pool", "imgs", "--copy_checkpoint", "same"], SAME_NEEDS_THRESHOLDS),
    (["dedup", "--pool", "imgs", "--checkpoint", "x.pth", "--copy_checkpoint", "same", "--dedup_threshold", "0.9"],
     SAME_NEEDS_THRESHOLDS),  # both thresholds, chosen for that embedding (the preset's are the descriptor's)
    (["retrieve"], "curate.py: error: --pool is required"),
])
def test_refusals_through_main(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        curate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(message)


def test_what_needs_no_copy_detector():
    """Retrieval alone, a precomputed .npy pool (an embedding the user chose), and embedding."""
    for argv in (["retrieve", "--pool", "imgs", "--checkpoint", "pixels"], ["dedup", "--pool", "p.npy"],
                 ["embed", "--pool", "imgs", "--checkpoint", "pixels"],
                 ["dedup", "--pool", "imgs", "--copy_checkpoint", "same", "--dedup_threshold", "0.9",
                  "--relative_threshold", "0.8"]):
        assert curate.parse_config(argv)[0] == argv[0]


def test_dedup_with_the_retrieval_embedding_at_thresholds_given(fashion_mnist_dir, tmp_path):
    """--copy_checkpoint same: one embedding (the retrieval backbone's) serves deduplication and retrieval."""
    from data import FashionMNIST
    data = FashionMNIST(str(fashion_mnist_dir), train=False)
    write_pngs(tmp_path / "pool", data.images[:40], data.labels[:40])
    write_pngs(tmp_path / "pool", data.images[:5], data.labels[:5], start=100)  # exact copies
    out = tmp_path / "out"
    curate.main(["dedup", "--preset", "tiny", "--pool", str(tmp_path / "pool"), "--out", str(out),
                 "--copy_checkpoint", "same", "--dedup_threshold", "0.99", "--relative_threshold", "0.95"])
    assert [json.loads(p.read_text())["checkpoint"] for p in out.glob("emb_*.json")] == ["pixels"]
    assert (np.load(out / "pool_status.npy") == 1).sum() == 5
