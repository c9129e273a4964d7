"""Tests for visualize.py, run through `eval.py pca` and `eval.py attention`: sizes in whole patches, the PCA
foreground on a made-up case, the sheets' layout, and parity of patch grids and attention with the model.

Run: python -m pytest -q tests/test_visualize.py   (CPU). The real-photo test uses Debian's opencv-doc sample
images (`apt-get install opencv-doc`) and skips cleanly without them.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import visualize as vis
from model import DinoVisionTransformer
from test_eval import fixture_vit, save_train_checkpoint, smooth_picture  # noqa: F401 (fixture_vit: a fixture)

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")


# ---------------------------------------------------------------------------------------------------------------
# Sizes, the PCA foreground on a made-up case, parity with the model
# ---------------------------------------------------------------------------------------------------------------
def test_fed_size_keeps_aspect_in_whole_patches():
    assert vis.fed_size(480, 640, 448, 14) == (448, 602)
    assert vis.fed_size(28, 28, 28, 4) == (28, 28)
    h, w = vis.fed_size(426, 535, 224, 14)
    assert h % 14 == 0 and w % 14 == 0 and abs(w / h - 535 / 426) < 14 / h


def test_pca_foreground_is_the_object_not_the_border():
    # 6x8 grid: background patches share one feature, a 2x3 object in the middle another (+ small noise)
    g = torch.Generator().manual_seed(0)
    grid = torch.zeros(6, 8, 16)
    grid[:, :, 0] = 1.0
    grid[2:4, 3:6, 0], grid[2:4, 3:6, 1] = 0.0, 1.0
    grid += 0.01 * torch.randn(6, 8, 16, generator=g)
    (rgb, fg), = vis.pca_rgb([grid])
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[2:4, 3:6] = True
    assert torch.equal(fg, expected)
    assert rgb[~fg].abs().max() == 0 and rgb.shape == (6, 8, 3) and rgb.max() <= 1


def test_patch_grid_and_attention_equal_forward_features(fixture_vit):
    # fed at a patch multiple with the aspect kept; patch grid = x_norm_patchtokens row-major
    model, _, _ = fixture_vit
    xp = vis.prepare_picture(smooth_picture(70, 90), 56, model.patch_size)
    assert xp.shape == (1, 3, 56, 70)
    grid = vis.patch_grid(model, xp)
    with torch.no_grad():
        ref_patches = model.forward_features(xp)["x_norm_patchtokens"][0]
    torch.testing.assert_close(grid, ref_patches.reshape(4, 5, -1), atol=1e-5, rtol=1e-5)
    attn = vis.cls_attention(model, xp)
    assert attn.shape == (model.blocks[-1].attn.num_heads, 4, 5) and (attn > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The commands: PNGs at the image's size, sheets, checkpoints of each layout
# ---------------------------------------------------------------------------------------------------------------
def run_pictures(model_args, state_dict, tmp_path, image_paths):
    ckpt = save_train_checkpoint(model_args, state_dict, tmp_path / "ckpt.pth")
    pca = ev.main(["pca", str(ckpt), *map(str, image_paths), "--picture_size", "56", "--out", str(tmp_path)])
    attn = ev.main(["attention", str(ckpt), str(image_paths[0]), "--picture_size", "56", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "ckpt_eval_pca.json").read_text())["results"]["pngs"] == pca["pngs"]
    return pca["pngs"], attn["pngs"]


def test_pca_and_attention_pngs_have_the_image_size(fixture_vit, tmp_path):
    _, model_args, state_dict = fixture_vit
    paths = []
    for i, (h, w) in enumerate([(50, 75), (64, 40)]):  # one landscape, one portrait
        paths.append(tmp_path / f"pic{i}.png")
        vis.save_png(smooth_picture(h, w, seed=i).permute(1, 2, 0), paths[-1])
    pca, attn = run_pictures(model_args, state_dict, tmp_path, paths)
    assert [Image.open(p).size for p in pca] == [(75, 50), (40, 64)]  # PIL sizes are (width, height)
    assert Image.open(tmp_path / "pic0_pca_sheet.png").size == (240 + 100, 2 * 160)  # 160 px rows, aspect kept
    # one attention sheet: input, mean, 4 heads = 6 panels of 240x160 (+16 px caption), 4 px gaps
    assert len(attn) == 1 and Image.open(attn[0]).size == (6 * (240 + 4) + 4, 160 + 16 + 2 * 4)


def test_released_layout_bare_state_dict_without_sidecar(tmp_path):
    # dinov2_vits14_pretrain.pth is a bare state dict; the architecture is read off its shapes (64-wide heads)
    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=128, depth=2, num_heads=2, init_values=1.0)
    torch.save(vit.state_dict(), tmp_path / "hub_like.pth")
    vis.save_png(smooth_picture(30, 45).permute(1, 2, 0), tmp_path / "pic.png")
    res = ev.main(["attention", str(tmp_path / "hub_like.pth"), str(tmp_path / "pic.png"), "--picture_size", "28"])
    assert len(res["pngs"]) == 1
    # input, mean, 2 heads: 4 panels of 240 x 160 px
    assert Image.open(res["pngs"][0]).size == (4 * (240 + 4) + 4, 160 + 16 + 8)


def test_fashion_mnist_pictures_by_index(fashion_mnist_dir):
    assert vis.load_picture("fashion-mnist:19").shape == (3, 28, 28)
    assert vis.picture_name("fashion-mnist:19") == "fashion-mnist_19" and vis.picture_name("a/b.jpg") == "b"


def test_pca_and_attention_pngs_on_a_real_photo(fixture_vit, tmp_path):
    photo = OPENCV_DATA / "squirrel_cls.jpg"
    if not photo.exists():
        pytest.skip("real photos come with Debian's opencv-doc: apt-get install opencv-doc")
    _, model_args, state_dict = fixture_vit
    pca, attn = run_pictures(model_args, state_dict, tmp_path, [photo])
    size = Image.open(photo).size
    assert Image.open(pca[0]).size == size and len(attn) == 1


def test_attention_sheet_shows_input_mean_and_heads():
    img = smooth_picture(28, 28)
    maps = torch.zeros(3, 4, 4)
    maps[:, 1, 2] = 1.0  # every head looks at one patch
    sheet = np.asarray(vis.attention_sheet(img, maps, height=112), dtype=np.float32) / 255
    assert sheet.shape == (112 + 16 + 8, 5 * (112 + 4) + 4, 3)  # input, mean, 3 heads
    panel = lambda i: sheet[4 + 16:4 + 16 + 112, 4 + i * 116:4 + i * 116 + 112]  # [112,112,3]
    expected_input = F.interpolate(img[None], size=(112, 112), mode="nearest")[0]  # [3,112,112]
    expected_input = expected_input.permute(1, 2, 0).numpy()
    assert np.abs(panel(0) - expected_input).max() < 1 / 255 + 1e-6  # the input itself
    for i in range(1, 5):  # the attended patch (row 1, column 2 of 4x4 blocks) is the brightest
        brightness = panel(i).mean(-1)
        assert brightness[28:56, 56:84].mean() > brightness.mean() + 0.2

