"""Tests for eval.py: k-NN votes, the baselines, the linear-probe grid, retrieval metrics, feature parity
and the command line. The pictures (pca / attention) are tested in test_visualize.py.

Run: python -m pytest -q tests/test_eval.py   (CPU)
"""
import gzip
import inspect
import json
import random
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import train
from data import FashionMNIST, eval_transform, extract_features, knn_classify
from model import DinoVisionTransformer


# ---------------------------------------------------------------------------------------------------------------
# Helpers: the reference ViT from the fixtures, synthetic pictures and image folders
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fixture_vit(fixtures_dir):
    fx = torch.load(fixtures_dir / "vit_tiny_reg.pt", weights_only=True)
    accepted = inspect.signature(DinoVisionTransformer).parameters
    model_args = {k: v for k, v in fx["config"].items() if k in accepted}
    model = DinoVisionTransformer(**model_args)
    model.load_state_dict(fx["state_dict"])
    return model.eval(), model_args, fx["state_dict"]


def smooth_picture(height, width, seed=0):
    """A blob on a gradient: something with a foreground, made without any image files."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    blob = (-(((xx - 0.2) / 0.4) ** 2 + ((yy + 0.1) / 0.3) ** 2)).exp()
    colour = torch.rand(3, 1, 1, generator=g)
    return (0.3 * (xx + 1) / 2 + colour * blob).clamp(0, 1).expand(3, -1, -1).contiguous()  # [3,H,W]


def write_images(folder, n, size=(40, 52), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)  # coarse random pattern, upsampled: varied images
        Image.fromarray(base).resize(size, Image.BICUBIC).save(folder / f"{i:03d}.png")


def save_train_checkpoint(model_args, state_dict, path):
    """This project's train.py layout: {"teacher": {"backbone.<key>": ...}, "model_args": ...}."""
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state_dict.items()}, "model_args": model_args}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# k-NN (the votes live in data.knn_classify; eval.py reports them)
# ---------------------------------------------------------------------------------------------------------------
def test_knn_well_separated_clusters_are_perfect():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 32, generator=g), dim=1)  # 10 classes
    train_y, test_y = torch.arange(10).repeat(30), torch.arange(10).repeat(5)
    train_x = F.normalize(centres[train_y] + 0.02 * torch.randn(300, 32, generator=g), dim=1)
    test_x = F.normalize(centres[test_y] + 0.02 * torch.randn(50, 32, generator=g), dim=1)
    res = knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20, 100, 200), temperature=0.07)
    for k in (10, 20, 100, 200):
        assert res[k]["top1"] == 100.0 and res[k]["top5"] == 100.0


def test_knn_votes_are_softmax_of_similarity_over_temperature():
    # One class-0 neighbour at similarity 1.0, two class-1 neighbours at 0.9. Votes softmax(sim/T) summed per class:
    # T=0.07: class 0 gets e^(1/.07) / (e^(1/.07) + 2 e^(.9/.07)) = 0.676 -> class 0 wins although outnumbered;
    # T=1:    class 0 gets e^1 / (e^1 + 2 e^.9) = 0.356 -> class 1 wins.
    angle = np.arccos(0.9)
    train_x = torch.tensor([[1.0, 0.0], [np.cos(angle), np.sin(angle)], [np.cos(angle), -np.sin(angle)],
                            [-1.0, 0.0]], dtype=torch.float32)
    train_y = torch.tensor([0, 1, 1, 2])
    query, target = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    w0 = np.exp(1 / 0.07) / (np.exp(1 / 0.07) + 2 * np.exp(0.9 / 0.07))
    assert w0 == pytest.approx(0.676, abs=1e-3)
    assert knn_classify(train_x, train_y, query, target, ks=(3,), temperature=0.07)[3]["top1"] == 100.0
    assert knn_classify(train_x, train_y, query, target, ks=(3,), temperature=1.0)[3]["top1"] == 0.0
    assert knn_classify(train_x, train_y, query, target, ks=(1,), temperature=1.0)[1]["top1"] == 100.0


# ---------------------------------------------------------------------------------------------------------------
# Baselines: raw pixels and train.py's network at initialisation, on a small IDX set
# ---------------------------------------------------------------------------------------------------------------
def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
                + arr.tobytes())


def idx_folder(folder):
    """A 64-image train / 32-image test set in Fashion-MNIST's IDX format, 4 classes of brightness."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split, n in (("train", 64), ("t10k", 32)):
        labels = np.arange(n) % 4
        images = rng.integers(0, 60, (n, 28, 28)) + 50 * labels[:, None, None]  # [n,28,28] in [0,210)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def test_baselines_are_knn_of_raw_pixels_and_of_the_untrained_tiny_network(tmp_path):
    data = idx_folder(tmp_path / "idx")
    res = ev.main(["baselines", "--data", str(data), "--knn_ks", "5,20", "--out", str(tmp_path / "out")])
    top1 = {(r["features"], r["k"]): r["top1"] for r in res["knn"]}
    assert set(top1) == {(f, k) for f in ("raw pixels", "tiny at init") for k in (5, 20)}
    train_set, test_set = FashionMNIST(str(data), train=True), FashionMNIST(str(data), train=False)
    # raw pixels: the stored uint8 images, flattened and compared by cosine
    raw = lambda ds: (F.normalize(torch.from_numpy(ds.images).float().flatten(1), dim=-1),
                      torch.from_numpy(ds.labels))
    expected = knn_classify(*raw(train_set), *raw(test_set), ks=(5, 20), temperature=0.07)
    assert [top1["raw pixels", k] for k in (5, 20)] == [expected[k]["top1"] for k in (5, 20)]
    # the network: train.py's tiny teacher as a run with seed 0 starts, at its 28-px crop size
    torch.manual_seed(0)
    _, teacher, _ = train.build_student_teacher(train.Config(**train.PRESETS["tiny"]))
    train_feats, test_feats = (extract_features(teacher.backbone, ds, 28) for ds in (train_set, test_set))
    expected = knn_classify(*train_feats, *test_feats, ks=(5, 20), temperature=0.07)
    assert [top1["tiny at init", k] for k in (5, 20)] == [expected[k]["top1"] for k in (5, 20)]
    saved = json.loads((tmp_path / "out" / "tiny_init_eval_baselines.json").read_text())
    assert saved["checkpoint"] is None and saved["results"] == res and saved["config"]["image_size"] == 28


def test_pixel_features_are_resized_flattened_and_unit_length():
    images = [torch.rand(3, 20, 30), torch.rand(3, 14, 14)]
    feats, labels = ev.pixel_features(ev.ListDataset(images, [1, 0]), 14)
    assert feats.shape == (2, 3 * 14 * 14) and labels.tolist() == [1, 0]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(feats[1], F.normalize(images[1].flatten(), dim=0))  # 14 px: not resized


# ---------------------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------------------
def test_linear_inputs_follow_the_official_layout():
    cls = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [N=2, 4 blocks, D=3]
    avg = -torch.ones(2, 3)
    v = ev.linear_inputs(cls, avg, (1, 4))
    assert set(v) == {"blocks=1 avgpool=0", "blocks=1 avgpool=1", "blocks=4 avgpool=0", "blocks=4 avgpool=1"}
    assert torch.equal(v["blocks=1 avgpool=0"], cls[:, 3])
    assert torch.equal(v["blocks=4 avgpool=0"], cls.flatten(1))
    assert torch.equal(v["blocks=1 avgpool=1"], torch.cat([cls[:, 3], avg], 1))


def test_linear_grid_fits_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(16, 4, generator=g)  # 4 classes, linearly separable by construction
    x = torch.randn(1000, 16, generator=g)
    top2 = (x @ w_true).topk(2, dim=1)
    keep = (top2.values[:, 0] - top2.values[:, 1]) > 0.5  # a margin, so that "separable" is not borderline
    x, y = x[keep][:600], top2.indices[keep][:600, 0]
    cls, avg = x.view(-1, 2, 8), torch.randn(len(x), 4, generator=g)  # two "blocks" of 8 dims, noise as avgpool
    lrs = (1e-4, 0.1, 1.0)
    heads = ev.train_linear_grid(cls[:500], avg[:500], y[:500], (1, 2), 4, lrs, iters=300, batch_size=64)
    acc = ev.grid_accuracy(heads, cls[500:], avg[500:], y[500:], (1, 2))
    assert set(acc) == {"blocks=1 avgpool=0", "blocks=1 avgpool=1", "blocks=2 avgpool=0", "blocks=2 avgpool=1"}
    full = acc["blocks=2 avgpool=0"]
    assert full.shape == (3,)
    assert full[2] >= 98.0  # the large learning rate fits the full features
    assert full[0] < full[2]  # lr 1e-4 barely moves from the N(0, 0.01) init in 300 steps
    assert acc["blocks=1 avgpool=0"][2] < full[2]  # the last block alone (half the features) does not separate


def test_linear_heads_are_independent_of_each_other():
    # All grid points train in one loop; changing one head's learning rate must not change another head.
    g = torch.Generator().manual_seed(1)
    cls, avg = torch.randn(200, 1, 8, generator=g), torch.randn(200, 8, generator=g)
    y = torch.randint(0, 3, (200,), generator=g)
    h1 = ev.train_linear_grid(cls, avg, y, (1,), 3, (0.01, 0.5), iters=20, batch_size=32, seed=3)
    h2 = ev.train_linear_grid(cls, avg, y, (1,), 3, (0.01, 5.0), iters=20, batch_size=32, seed=3)
    (w1, b1), (w2, b2) = h1["blocks=1 avgpool=1"], h2["blocks=1 avgpool=1"]
    assert w1.shape == (2, 16, 3) and b1.shape == (2, 1, 3)
    torch.testing.assert_close(w1[0], w2[0])
    torch.testing.assert_close(b1[0], b2[0])
    assert not torch.allclose(w1[1], w2[1])


# ---------------------------------------------------------------------------------------------------------------
# Retrieval / copy detection
# ---------------------------------------------------------------------------------------------------------------
def test_retrieval_metrics_hand_made():
    db = torch.eye(4)  # 4 orthogonal database images
    q = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0.5, 1.0, 0, 0], [0, 0.9, 0.1, 0]]), dim=1)
    m = ev.retrieval_metrics(q, db, torch.tensor([0, 1, 2]))  # the third query ranks its original 2nd
    assert m["mAP"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["recall@1"] == pytest.approx(2 / 3) and m["recall@10"] == 1.0


def test_make_copy_strength_zero_is_identical_and_edits_grow():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(ev.make_copy(img, 0.0, random.Random(0))), np.asarray(img))
    light, heavy = ev.make_copy(img, 0.2, random.Random(0)), ev.make_copy(img, 1.0, random.Random(0))
    assert heavy.size[0] * heavy.size[1] < light.size[0] * light.size[1] < 80 * 60  # crops grow with strength


def test_retrieval_identical_copies_are_found_and_heavy_edits_are_harder(fixture_vit, tmp_path):
    model, _, _ = fixture_vit
    write_images(tmp_path / "photos", 24)
    cfg = ev.EvalConfig(data=str(tmp_path / "photos"), image_size=56, batch_size=64, retrieval_originals=8,
                        retrieval_distractors=16, retrieval_copies=2, retrieval_strengths=(0.0, 1.0))
    rows = ev.run_retrieval(model, cfg, "cpu")["retrieval"]
    assert rows[0]["mAP"] == 1.0 and rows[0]["recall@1"] == 1.0
    assert rows[1]["mAP"] < 1.0 and rows[1]["sim_to_original"] < rows[0]["sim_to_original"]


# ---------------------------------------------------------------------------------------------------------------
# Parity: eval.py's features are forward_features' outputs on the same preprocessed input (no silent resize)
# ---------------------------------------------------------------------------------------------------------------
def test_features_equal_forward_features(fixture_vit):
    model, _, _ = fixture_vit
    images = [smooth_picture(70, 90, seed=s) for s in range(3)]
    dataset = ev.ListDataset(images, [0, 1, 2])
    x = torch.stack([eval_transform(img, 56) for img in images])  # [3,3,56,56] the preprocessed input
    with torch.no_grad():
        ref = model.forward_features(x)
        ref_blocks = model.get_intermediate_layers(x, n=3, return_class_token=True)
    cls, avg, labels = ev.linear_features(model, dataset, 56, n_blocks=3, batch_size=2)
    torch.testing.assert_close(cls[:, -1], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(avg, ref["x_norm_patchtokens"].mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls[:, 0], ref_blocks[0][1], atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [0, 1, 2]
    feats, _ = extract_features(model, dataset, 56, batch_size=2)  # what knn and retrieval use
    torch.testing.assert_close(feats, F.normalize(ref["x_norm_clstoken"], dim=-1), atol=1e-5, rtol=1e-5)


def test_image_size_must_tile_into_patches(fixture_vit):
    model, _, _ = fixture_vit
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        ev.check_image_size(model, 50)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def test_cli_overrides_presets_and_unknown_keys(capsys):
    cfg, args = ev.parse_config(["knn", "c.pth", "--preset", "tiny", "--knn_ks", "5,7"])
    assert (args.command, args.checkpoint, args.images) == ("knn", "c.pth", [])
    assert cfg.knn_ks == (5, 7) and cfg.batch_size == 512 and cfg.knn_temperature == 0.07
    assert ev.EvalConfig().knn_ks == (10, 20, 100, 200) and ev.EvalConfig().image_size == 0
    for argv, message in [(["--no_such_key", "1"], "unrecognized arguments: --no_such_key"),
                          (["--knn_ks", "10,abc"], "--knn_ks: '10,abc': 'abc' is not an integer"),
                          (["--knn_ks", "0,10"], "--knn_ks: 0,10 is too small; allowed: >= 1"),
                          (["--device", "tpu"],
                           "--device: tpu is not allowed; allowed: auto, cpu, cuda, mps")]:
        with pytest.raises(SystemExit) as e:
            ev.parse_config(["knn", "c.pth", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    for argv, message in [(["pca", "c.pth"], "pca needs at least one image"),
                          (["knn"], "knn needs a checkpoint"),
                          (["baselines", "c.pth"], "baselines takes no checkpoint, got c.pth"),
                          (["baselines", "--train_preset", "vit_x"],
                           "--train_preset: vit_x is not allowed; allowed: paper, vit_s")]:
        with pytest.raises(SystemExit) as e:
            ev.parse_config(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    cfg, args = ev.parse_config(["baselines", "--train_preset", "vit_s"])
    assert args.checkpoint is None and cfg.train_preset == "vit_s"


def test_cli_knn_and_linear_on_a_folder(fixture_vit, tmp_path, capsys):
    _, model_args, state_dict = fixture_vit
    for split, n in (("train", 12), ("val", 6)):
        for c in range(2):
            write_images(tmp_path / "data" / split / f"class{c}", n, seed=10 * c + (split == "val"))
    (tmp_path / "run").mkdir()
    ckpt = save_train_checkpoint(model_args, state_dict, tmp_path / "run" / "ckpt.pth")
    common = ["--data", str(tmp_path / "data"), "--image_size", "56", "--batch_size", "8"]
    knn = ev.main(["knn", str(ckpt), *common, "--knn_ks", "1,5"])
    assert [r["k"] for r in knn["knn"]] == [1, 5] and "top5" not in knn["knn"][0]  # 2 classes: no top-5
    assert (tmp_path / "run" / "ckpt_eval_knn.json").exists()
    lin = ev.main(["linear", str(ckpt), *common, "--linear_epochs", "30",
                   "--linear_lrs", "0.01,1.0"])
    assert lin["best"]["variant"].startswith("blocks=") and len(lin["grid"]) == 2 * 2 * 2  # 3 blocks < 4 -> 1, 3
    assert lin["iterations"] == 30  # 22 fitted features < batch 1024: one batch per epoch
    assert "top1" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# What a new user runs into: the checkpoint's own size, where results go, non-backbones, labels
# ---------------------------------------------------------------------------------------------------------------
def save_tiny_backbone(folder, img_size=28, patch_size=7):
    """What train.py writes for its tiny preset: a bare state dict + <stem>.json (model_args)."""
    torch.manual_seed(0)
    model_args = dict(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=2)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(DinoVisionTransformer(**model_args).state_dict(), folder / "teacher_backbone.pth")
    (folder / "teacher_backbone.json").write_text(json.dumps({"model_args": model_args}))
    return folder / "teacher_backbone.pth"


def two_class_folders(root, train_classes=("a", "b"), val_classes=("a", "b"), n=4):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for i, c in enumerate(classes):
            write_images(root / split / c, n, size=(28, 28), seed=10 * i + (split == "val"))
    return root


def test_image_size_comes_from_the_checkpoint_and_out_redirects_the_json(tmp_path):
    ckpt = save_tiny_backbone(tmp_path / "run")
    data = two_class_folders(tmp_path / "data")
    ev.main(["knn", str(ckpt), "--data", str(data), "--knn_ks", "1",
             "--out", str(tmp_path / "results")])
    saved = json.loads((tmp_path / "results" / "teacher_backbone_eval_knn.json").read_text())
    assert saved["config"]["image_size"] == 28  # no --preset needed
    assert saved["config"]["picture_size"] == 28
    assert not (tmp_path / "run" / "teacher_backbone_eval_knn.json").exists()
    big = ev.EvalConfig()
    released = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=32, depth=1,
                                     num_heads=2)
    assert ev.default_sizes(big, released).image_size == 224  # the paper's 224, not 518


def test_unwritable_output_is_an_error_before_any_work(tmp_path, capsys):
    ckpt = save_tiny_backbone(tmp_path / "run")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:  # no such data folder: the work would fail if it started
        ev.main(["knn", str(ckpt), "--data", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "a_file" / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("eval.py: error: cannot write the results to ")
    assert err.endswith("pass --out <a writable folder>") and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, message", [
    ("tensor", "holds a Tensor, not a state dict"),
    ("distill", "is a distill.py checkpoint (students ['vit_tiny_d2']): evaluate"),
    ("heads", "has no ViT backbone weights"),
    ("text", "is not a PyTorch checkpoint (it starts with b'step'"),
    ("missing", "does not exist"),
])
def test_files_that_are_not_backbones_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "thing.pth"
    if content == "tensor":
        torch.save(torch.randn(4, 4), path)
    elif content == "distill":  # distill.py's checkpoint layout
        torch.save({"config": {}, "step": 3, "students": [{"name": "vit_tiny_d2", "ema": {}}]},
                   path)
    elif content == "heads":
        torch.save({"dino_head.mlp.0.weight": torch.randn(2, 2)}, path)
    elif content == "text":
        path.write_text("step 1 loss 3.2\n")
    with pytest.raises(SystemExit) as e:
        ev.main(["knn", str(path), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert "expected" in err or content == "distill"  # says what it expects


def test_train_and_val_class_folders_share_one_index(tmp_path, capsys):
    data = two_class_folders(tmp_path / "data", train_classes=("a", "b"), val_classes=("a", "c"))
    train_set, test_set = ev.load_splits(ev.EvalConfig(data=str(data)))
    assert train_set.classes == test_set.classes == ["a", "b", "c"]
    assert sorted(set(train_set.labels.tolist())) == [0, 1]
    assert sorted(set(test_set.labels.tolist())) == [0, 2]
    assert test_set[len(test_set) - 1][1] == 2  # val/c: index 2 ("c"), not 1 (train's "b")
    assert "only in train: ['b']; only in test: ['c']" in capsys.readouterr().out


def test_linear_defaults_are_the_official_ones():
    # dinov2/eval/linear.py: learning_rates, epochs=10, batch_size=128 per GPU (x 8 GPUs), scale_lr
    cfg = ev.EvalConfig()
    assert cfg.linear_lrs == (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
    assert (cfg.linear_epochs, cfg.linear_batch_size, cfg.linear_n_blocks) == (10, 128 * 8, (1, 4))


def test_linear_probe_trains_the_official_number_of_epochs():
    # official: 10 epochs of 1,250 steps at batch 1,024 = 12,500 steps ~ 10 passes over
    # ImageNet's 1,281,167 images
    assert ev.linear_iterations(1_281_167, 10, 1024) == 12_512
    assert ev.linear_iterations(54_000, 10, 1024) == 528  # Fashion-MNIST minus the held-out 10%
    assert ev.linear_iterations(20, 10, 1024) == 10  # fewer features than a batch: 1 per epoch