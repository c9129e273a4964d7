"""Pictures of what a frozen backbone sees: PCA of its patch features as RGB, and where its class
token attends.

Run through eval.py, which loads the checkpoint and writes the PNGs beside it (or to --out):
    python eval.py pca runs/tiny/teacher_backbone.pth fashion-mnist:19 fashion-mnist:2  # test images
    python eval.py pca dinov2_vits14_pretrain.pth a.jpg b.jpg    # one PCA over both (Fig. 1 style)
    python eval.py attention dinov2_vits14_pretrain.pth a.jpg    # input, mean and every head
Each image is fed with its shorter side at --picture_size px, aspect kept, in whole patches (said,
not silent); each PNG has the image's own size, and a sheet shows the inputs with what was drawn.
run_pca and run_attention read picture_size, pca_threshold and sheet_height of eval.EvalConfig.

Paper (arXiv 2304.07193) -> code
    Sec. 7.5 Fig. 1 PCA of patch features, first PC           -> patch_grid, pca_rgb, run_pca
        thresholded = foreground
    class-token attention per head of the last block          -> cls_attention, run_attention
        (DINO v1 Fig. 1)

Deviation (also in the README): the paper gives neither the threshold nor the sign of the first PC;
see pca_rgb.

Shape legend: [3,H,W] an image at its own size; [1,3,h,w] the same image as fed; patch grids
[h/p, w/p] for patch size p, written [h,w] where only the grid is in play; N patches of one image,
M of all images, D width, H heads in attention maps [H,h,w].
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from augment import normalize, resize
from data import build_dataset


# --------------------------------------------------------------------------------------------------
# Feeding a picture: image files or Fashion-MNIST test images, at a size in whole patches
# --------------------------------------------------------------------------------------------------
def fed_size(height, width, short_side, patch):
    """(h, w) px fed to the backbone: shorter side -> short_side, aspect kept, both rounded to whole
    patches."""
    scale = short_side / min(height, width)
    return (max(patch, round(height * scale / patch) * patch),
            max(patch, round(width * scale / patch) * patch))


def load_picture(path):
    """An image file, or "fashion-mnist:<i>" for test image i of Fashion-MNIST -> [3,H,W] in [0,1]"""
    if str(path).startswith("fashion-mnist:"):
        return build_dataset("fashion-mnist", train=False)[int(str(path).split(":")[1])][0]
    with Image.open(path) as im:
        return to_tensor(im)


def picture_name(path):
    return Path(str(path).replace(":", "_")).stem  # fashion-mnist:19 -> fashion-mnist_19


def prepare_picture(img, short_side, patch):
    """[3,H,W] in [0,1] -> normalised [1,3,h,w], h and w multiples of the patch size (said, not
    silent)."""
    h, w = fed_size(*img.shape[-2:], short_side, patch)
    print(f"{tuple(img.shape[-2:])} px image fed at {h}x{w} px = {h // patch}x{w // patch} patches "
          f"of {patch} px")
    return normalize(resize(img, (h, w)))[None]


def to_tensor(pil):
    """PIL -> [3,H,W] float in [0,1]."""
    arr = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0  # [H,W,3]
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_pil(img):
    """[3,H,W] float in [0,1] -> PIL RGB."""
    return Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


# --------------------------------------------------------------------------------------------------
# PCA of patch features (Sec. 7.5, Fig. 1): one PCA over all images, its first PC the foreground
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def patch_grid(backbone, x):
    """x [1,3,h,w] -> final-norm patch tokens as a grid [h/p, w/p, D] (x_norm_patchtokens,
    row-major)."""
    p = backbone.patch_size
    tokens = backbone.forward_features(x)["x_norm_patchtokens"][0]  # [N,D]
    return tokens.reshape(x.shape[-2] // p, x.shape[-1] // p, -1).float().cpu()  # [N,D] -> [h,w,D]


def principal_components(x, k):
    """x [M,D] -> projections on the first k principal components [M,k] (sign as SVD returns it)."""
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # rows of v: components, largest variance first
    return x @ v[:k].T  # [M,D] @ [D,k] -> [M,k]


def pca_rgb(grids, threshold=0.0):
    """The paper's PCA picture for a set of images (Sec. 7.5): one PCA over the patches of all images;
    patches whose first component exceeds `threshold` standard deviations are foreground; a second PCA
    over the foreground only gives three components, min-max scaled to [0,1] as RGB; background black.
    The sign of a component is arbitrary: the first is flipped so that image borders are mostly
    background (objects rarely fill the frame).
    grids: list of [h,w,D] -> list of ([h,w,3] in [0,1], foreground [h,w] bool)."""
    flat = torch.cat([g.flatten(0, 1) for g in grids])  # [M,D], M = all patches of all images
    border = torch.cat([_border_mask(*g.shape[:2]).flatten() for g in grids])  # [M]
    pc1 = principal_components(flat, 1)[:, 0]
    pc1 = pc1 / pc1.std().clamp_min(1e-8)
    if (pc1[border] > threshold).float().mean() > 0.5:
        pc1 = -pc1
    fg = pc1 > threshold
    if fg.sum() < 3:  # nothing stands out (e.g. a uniform image): colour every patch
        fg = torch.ones_like(fg)
    rgb = torch.zeros(len(flat), 3)
    comps = principal_components(flat[fg], 3)  # [Mfg,3]
    lo, hi = comps.min(0).values, comps.max(0).values
    rgb[fg, :comps.shape[1]] = (comps - lo) / (hi - lo).clamp_min(1e-8)
    out, start = [], 0
    for g in grids:
        h, w = g.shape[:2]
        rows = slice(start, start + h * w)  # this image's patches of the M
        out.append((rgb[rows].reshape(h, w, 3), fg[rows].reshape(h, w)))
        start += h * w
    return out


def _border_mask(h, w):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


def run_pca(backbone, cfg, device, images, out_dir):
    pictures = [load_picture(p) for p in images]
    fed = [prepare_picture(img, cfg.picture_size, backbone.patch_size).to(device) for img in pictures]
    grids = [patch_grid(backbone, x) for x in fed]
    written, pcas = [], []
    for path, img, (rgb, fg) in zip(images, pictures, pca_rgb(grids, cfg.pca_threshold)):
        pcas.append(upsample(rgb, *img.shape[-2:]))  # [H,W,3], the image's own size
        written.append(save_png(pcas[-1], out_dir / f"{picture_name(path)}_pca.png"))
        print(f"{written[-1]}: foreground {100 * fg.float().mean():.0f}% of patches")
    sheet = pca_sheet(pictures, pcas, cfg.sheet_height)
    sheet_path = out_dir / f"{picture_name(images[0])}_pca_sheet.png"
    return {"pngs": written, "sheet": save_png(sheet, sheet_path)}


def pca_sheet(pictures, pcas, height):
    """Inputs on top, their PCA pictures below, each `height` px tall, aspect kept (as Fig. 1)."""
    # side by side: [height, sum of the widths, 3]
    top = torch.cat([scale_to_height(p.permute(1, 2, 0), height) for p in pictures], dim=1)
    bottom = torch.cat([scale_to_height(p, height) for p in pcas], dim=1)
    return torch.cat([top, bottom], dim=0)  # [2*height, sum W, 3]


# --------------------------------------------------------------------------------------------------
# Attention of the class token to the patches, per head of the last block (DINO v1 Fig. 1)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_attention(backbone, x):
    """x [1,3,h,w] -> attention of the class token to every patch, per head of the last block
    [H, h/p, w/p]
    (registers dropped: the token order is cls, registers, patches)."""
    p, r = backbone.patch_size, backbone.num_register_tokens
    attn = backbone.get_last_selfattention(x)[0]  # [H,1+R+N,1+R+N]
    cls_to_patches = attn[:, 0, 1 + r:]  # [H,N]
    return cls_to_patches.reshape(-1, x.shape[-2] // p, x.shape[-1] // p).float().cpu()  # [H,h,w]


def overlay(img, attention):
    """The attention map [h,w] (patch grid) as a heat map over the grey image [3,H,W]: where the
    class token looks is bright and coloured, the rest keeps the image's shapes, dimmed."""
    grey = img.mean(0, keepdim=True).expand(3, -1, -1).permute(1, 2, 0)  # [H,W,3]
    hot = upsample(heat(attention), *img.shape[-2:])  # [h,w,3] -> [H,W,3]
    return 0.5 * grey + 0.5 * hot


def heat(m):
    """[h,w] -> [h,w,3] black-red-yellow-white colour map of the min-max scaled values."""
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
    return torch.stack([(3 * m - i).clamp(0, 1) for i in range(3)], dim=-1)  # red, green, blue ramps


def attention_sheet(img, maps, height, columns=8):
    """One picture per image: the input, the mean over heads and each head of the last block,
    overlaid on the input, every panel `height` px tall with a caption above it, at most `columns`
    panels per row (the DINO v1 Fig. 1 kind of picture, with the image under the maps)."""
    panels = [("input", img.permute(1, 2, 0)),
              (f"mean of {len(maps)} heads", overlay(img, maps.mean(0)))]
    panels += [(f"head {h}", overlay(img, m)) for h, m in enumerate(maps)]
    rows = math.ceil(len(panels) / columns)
    columns = math.ceil(len(panels) / rows)  # balanced rows: 14 panels -> 2 rows of 7
    caption, gap = 16, 4
    tiles = [(name, scale_to_height(rgb, height)) for name, rgb in panels]
    width = tiles[0][1].shape[1]
    size = (columns * (width + gap) + gap, rows * (height + caption + gap) + gap)
    sheet = Image.new("RGB", size, (40, 40, 40))  # dark grey gaps
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for i, (name, tile) in enumerate(tiles):
        x, y = gap + (i % columns) * (width + gap), gap + (i // columns) * (height + caption + gap)
        draw.text((x + 2, y + 1), name, fill=(235, 235, 235), font=font)
        sheet.paste(Image.fromarray((tile * 255).round().byte().numpy()), (x, y + caption))
    return sheet


def run_attention(backbone, cfg, device, images, out_dir):
    written = []
    for path in images:
        img = load_picture(path)
        x = prepare_picture(img, cfg.picture_size, backbone.patch_size).to(device)
        maps = cls_attention(backbone, x)  # [H,h,w]
        written.append(str(out_dir / f"{picture_name(path)}_attention.png"))
        attention_sheet(img, maps, cfg.sheet_height).save(written[-1])
        print(f"{written[-1]}: input, mean over {len(maps)} heads, each head of the last block")
    return {"pngs": written}


# --------------------------------------------------------------------------------------------------
# Drawing: patch grids and pictures at a given size, PNG files
# --------------------------------------------------------------------------------------------------
def upsample(grid, height, width):
    """[h,w,C] patch grid -> [height,width,C], nearest: each patch stays a visible block at the
    image's size."""
    x = grid.permute(2, 0, 1)[None]  # [1,C,h,w]
    return F.interpolate(x, size=(height, width), mode="nearest")[0].permute(1, 2, 0)


def scale_to_height(rgb, height):
    """[H,W,3] -> [height, W*height/H, 3]. Small images are enlarged with nearest (pixels and
    patches stay sharp), large ones shrunk with antialiasing."""
    h, w = rgb.shape[:2]
    size, x = (height, max(1, round(w * height / h))), rgb.permute(2, 0, 1)[None]  # [1,3,H,W]
    if h < height:
        x = F.interpolate(x, size=size, mode="nearest")
    else:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    return x[0].permute(1, 2, 0).clamp(0, 1)


def save_png(rgb, path):
    """[H,W,3] in [0,1] -> PNG."""
    Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().numpy()).save(path)
    return str(path)
