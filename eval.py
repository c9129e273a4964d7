"""Evaluate a frozen DINOv2 backbone: k-NN, linear probe, copy retrieval, and pictures of what the features see.

Any checkpoint that model.load_model reads works: ours (runs/<name>/teacher_backbone.pth, or a train.py checkpoint)
or a released one (dinov2_vits14_pretrain.pth). Each command prints a small table and writes
<checkpoint stem>_eval_<command>.json beside the checkpoint; pictures go to --out (default: beside the checkpoint).

Run:
    python eval.py knn runs/tiny/teacher_backbone.pth --preset tiny       # Fashion-MNIST 60k/10k, minutes on 2 cores
    python eval.py linear runs/tiny/teacher_backbone.pth --preset tiny
    python eval.py retrieval runs/tiny/teacher_backbone.pth --preset tiny
    python eval.py pca runs/tiny/teacher_backbone.pth fashion-mnist:19 fashion-mnist:2 --preset tiny  # test images
    python eval.py pca dinov2_vits14_pretrain.pth a.jpg b.jpg              # one PCA over both images (Fig. 1 style)
    python eval.py attention dinov2_vits14_pretrain.pth a.jpg
    python eval.py knn dinov2_vits14_pretrain.pth --data /data/imagenet    # folders train/ and val/ with class folders
Every field of EvalConfig is an option (--knn_ks 10,20 --image_size 224 ...); unknown options are an error.

Cost, measured on 2 shared CPU cores (load 2-7) with the tiny preset's ViT (width 128, depth 4, patch 4, 28 px):
knn on all of Fashion-MNIST (60,000 + 10,000 images) 67-151 s wall (~105 s CPU), linear 150-240 s (features
100-150 s, 72 heads x 3,000 steps ~65 s), retrieval ~7 s, pca / attention < 1 s. Feature extraction dominates.
What it reaches (Fashion-MNIST test set): `python train.py` (tiny preset, 1,000 steps, 25 min) -> k-NN top-1 66.8%
(k=20; 55.7% for the same network at init), linear 75.1%; the PCA picture is assets/pca_example.png.

Paper (arXiv 2304.07193) -> code
    Sec. 6.1 Table 1 k-NN column (DINO protocol: k in {10,20,100,200}, T=0.07) -> run_knn (votes: data.knn_classify)
    Sec. 7.1 Table 4 linear probe; App. B.3 grid over blocks x avgpool x lr   -> linear_features, linear_inputs,
                                                                               train_linear_grid, run_linear
    Sec. 7.3 Table 9 instance recognition; Sec. 3 copy detection for dedup;
    Sec. 6.4 Table 3 (KoLeo helps retrieval most)                             -> make_copy, retrieval_metrics,
                                                                               run_retrieval
    Sec. 7.5 Fig. 1 PCA of patch features, first PC thresholded = foreground  -> patch_grid, pca_rgb, run_pca
    class-token attention per head of the last block (DINO v1 Fig. 1)         -> cls_attention, run_attention

Deviations from the paper (also in the README):
    linear: features computed once on centre crops (no random-resized-crop / flip while training the heads, the
        backbone never runs in the loop); the grid point is chosen on a held-out part of the training set and its
        test accuracy reported (the paper reports the best grid point on the validation set itself).
    retrieval: the Oxford/Paris/Met benchmarks of Sec. 7.3 need downloads; we measure copy detection on edited
        copies of whatever images are at hand (edits of the DISC21 benchmark that Sec. 3's dedup model was trained for).
    pictures: the paper does not give the threshold or the sign of the first PC; see pca_rgb.

Shape legend: B batch, N tokens (patches), D width, H heads, C classes, L learning rates, Q queries, M database images.
"""
import argparse
import io
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data import MapDataset, build_dataset, eval_transform, extract_features, knn_classify, normalize, resize
from model import load_model


# ---------------------------------------------------------------------------------------------------------------
# Configuration: defaults are the paper's / released evaluation code's values; "tiny" is the CPU preset
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    # data
    data: str = "fashion-mnist"  # labelled train split: "fashion-mnist", a folder of IDX files, or image folders
    test_data: str = ""  # test split; "" = build_dataset(data, train=False) (val/ or test/ inside `data`)
    image_size: int = 224  # px side fed to the backbone, must be a multiple of the patch size (paper: 224)
    batch_size: int = 256  # images per forward pass when extracting features (official knn.py: 256)
    num_workers: int = 0  # DataLoader workers for feature extraction
    device: str = "auto"  # "auto" = cuda when available, else cpu
    seed: int = 0  # held-out split, head init, copy edits
    # k-NN (Sec. 6.1, protocol of DINO v1 / the released eval/knn.py)
    knn_ks: tuple = (10, 20, 100, 200)  # numbers of neighbours voting
    knn_temperature: float = 0.07  # T in the vote weights softmax(similarity / T)
    # linear probe (Sec. 7.1, App. B.3; values of the released eval/linear.py)
    linear_n_blocks: tuple = (1, 4)  # class tokens of the last n blocks, concatenated
    linear_lrs: tuple = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # x batch/256
    linear_batch_size: int = 128  # samples per SGD step
    linear_iters: int = 12500  # SGD steps (10 epochs x 1250 iterations), cosine decay to 0
    linear_momentum: float = 0.9  # SGD momentum, weight decay 0
    linear_val_fraction: float = 0.1  # ours: held-out part of the training set that picks the grid point
    # retrieval / copy detection (Sec. 7.3, Sec. 3)
    retrieval_originals: int = 200  # (ours) database images whose copies are searched for
    retrieval_distractors: int = 1800  # (ours) further database images that are never copied
    retrieval_copies: int = 2  # (ours) edited copies per original and strength (the queries)
    retrieval_strengths: tuple = (0.0, 0.25, 0.5, 1.0)  # (ours) edit strength in [0,1]; 0 = identical copy
    # pictures (Sec. 7.5)
    picture_size: int = 448  # (ours) shorter side in px fed for pca/attention, rounded to whole patches
    pca_threshold: float = 0.0  # (ours, the paper gives none) foreground = first PC above this many std
    sheet_height: int = 160  # px height of each row of the pca sheet (inputs on top, PCA below)
    out: str = ""  # folder for the PNGs; "" = beside the checkpoint


PRESETS = {
    # 28 px Fashion-MNIST with a patch-4 ViT (7x7 patches), pictures at the 28 px it was trained at:
    # every command in a few CPU minutes
    # small features want larger learning rates than ImageNet's: the grid goes on up to 5 (best seen: 0.2)
    "tiny": dict(image_size=28, batch_size=512, linear_iters=3000, linear_batch_size=256,
                 linear_lrs=EvalConfig.linear_lrs + (0.2, 0.5, 1.0, 2.0, 5.0),
                 retrieval_originals=200, retrieval_distractors=1800, picture_size=28, sheet_height=112),
}


def parse_config(argv=None):
    """`python eval.py <command> <checkpoint> [images] --key value` -> (command, checkpoint, images, EvalConfig)."""
    parser = argparse.ArgumentParser(description="Evaluate a frozen DINOv2 backbone (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        sub = commands.add_parser(name)
        sub.add_argument("checkpoint", help="anything model.load_model reads (.pth/.pt)")
        if name in ("pca", "attention"):
            sub.add_argument("images", nargs="+", help="image files, or fashion-mnist:<test index>")
        sub.add_argument("--preset", choices=sorted(PRESETS), default=None, help="named preset applied first")
        for f in fields(EvalConfig):  # one option per field; argparse rejects anything else
            sub.add_argument(f"--{f.name}", default=None, help=f"default {f.default!r}")
    args = parser.parse_args(argv)
    values = asdict(EvalConfig()) | PRESETS.get(args.preset, {})
    for f in fields(EvalConfig):
        raw = getattr(args, f.name)
        if raw is not None:
            values[f.name] = _parse_value(raw, f.default)
    return args.command, args.checkpoint, getattr(args, "images", []), EvalConfig(**values)


def _parse_value(raw, default):
    if isinstance(default, tuple):  # "10,20,100" -> (10, 20, 100), element type from the default
        return tuple(type(default[0])(v) for v in raw.split(",") if v)
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    return type(default)(raw)


def resolve_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def check_image_size(backbone, size):
    """No silent resize: the backbone sees exactly size x size px, which must tile into whole patches."""
    p = backbone.patch_size
    if size % p:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {p}: use {size // p * p} "
                         f"or {(size // p + 1) * p}")
    print(f"feeding {size}x{size} px = {size // p}x{size // p} patches of {p} px")


# ---------------------------------------------------------------------------------------------------------------
# k-NN (Sec. 6.1): cosine similarity of L2-normalised class tokens, votes softmax(sim / T) summed per class
# ---------------------------------------------------------------------------------------------------------------
def run_knn(backbone, cfg, device):
    train_set, test_set = load_splits(cfg)
    check_image_size(backbone, cfg.image_size)
    extract = partial(extract_features, backbone, image_size=cfg.image_size, batch_size=cfg.batch_size,
                      device=device, num_workers=cfg.num_workers)
    train_feats, train_labels = extract(train_set)  # [Ntrain,D], L2-normalised
    test_feats, test_labels = extract(test_set)  # [Ntest,D]
    results = knn_classify(train_feats, train_labels, test_feats, test_labels, ks=cfg.knn_ks,
                           temperature=cfg.knn_temperature)
    n_classes = int(train_labels.max()) + 1
    rows = []
    for k in cfg.knn_ks:
        row = {"k": k, "top1": results[k]["top1"]}
        if n_classes > 5:  # top-5 of 5 classes or fewer is 100% by construction
            row["top5"] = results[k]["top5"]
        rows.append(row)
    return {"n_train": len(train_feats), "n_test": len(test_feats), "n_classes": n_classes, "knn": rows}


def load_splits(cfg):
    train_set = build_dataset(cfg.data, train=True)
    test_set = build_dataset(cfg.test_data or cfg.data, train=False)
    if getattr(train_set, "paths", None) is not None and train_set.paths == getattr(test_set, "paths", None):
        raise ValueError(f"{cfg.data} has no train/ and val/ (or test/) sub-folders: pass --test_data <folder>")
    return train_set, test_set


# ---------------------------------------------------------------------------------------------------------------
# Linear probe (Sec. 7.1, App. B.3): every grid point trained at once on features computed once
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def linear_features(backbone, dataset, image_size, n_blocks=4, batch_size=256, device="cpu", num_workers=0):
    """-> (cls [N,n,D]: class tokens of the last n blocks, each through the final norm (as the official
    ModelWithIntermediateLayers), avgpool [N,D]: mean patch token of the last block, labels [N])."""
    backbone.eval()
    loader = DataLoader(MapDataset(dataset, partial(eval_transform, size=image_size)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    cls, avgpool, labels = [], [], []
    for x, y in tqdm(loader, desc="features", leave=False, disable=len(loader) < 2):
        outs = backbone.get_intermediate_layers(x.to(device), n=n_blocks, return_class_token=True, norm=True)
        cls.append(torch.stack([c for _, c in outs], dim=1).float().cpu())  # n x [B,D] -> [B,n,D]
        avgpool.append(outs[-1][0].mean(dim=1).float().cpu())  # [B,N,D] -> [B,D]
        labels.append(y)
    return torch.cat(cls), torch.cat(avgpool), torch.cat(labels).long()


def linear_inputs(cls, avgpool, n_blocks_list):
    """The feature variants of the grid: {"blocks=n avgpool=a": [B, n*D (+D)]}, official create_linear_input order
    (class tokens of the last n blocks, oldest first, then the last block's average patch token). Built per batch,
    so that only cls [N,n,D] and avgpool [N,D] are kept in memory."""
    variants = {}
    for n in n_blocks_list:
        tokens = cls[:, -n:].flatten(1)  # [B,n,D] -> [B,n*D]
        variants[f"blocks={n} avgpool=0"] = tokens
        variants[f"blocks={n} avgpool=1"] = torch.cat([tokens, avgpool], dim=1)  # [B,(n+1)*D]
    return variants


def train_linear_grid(cls, avgpool, labels, n_blocks_list, num_classes, lrs, iters, batch_size, momentum=0.9,
                      seed=0, device="cpu"):
    """SGD on one batched linear layer per feature variant: weight [L,Din,C] holds the L heads that differ only by
    learning rate, so all grid points see the same batches and train in one loop. Init N(0, 0.01), bias 0, lr scaled
    by batch/256 and decayed with a cosine to 0, weight decay 0 (official eval/linear.py).
    -> {variant: (weight [L,Din,C], bias [L,1,C])}."""
    g = torch.Generator().manual_seed(seed)
    lr = torch.tensor(lrs, dtype=torch.float32, device=device).view(-1, 1, 1) * batch_size / 256  # [L,1,1]
    heads, momenta = {}, {}
    for name, x in linear_inputs(cls[:1], avgpool[:1], n_blocks_list).items():
        w = (torch.randn(len(lrs), x.shape[1], num_classes, generator=g) * 0.01).to(device).requires_grad_()
        b = torch.zeros(len(lrs), 1, num_classes, device=device, requires_grad=True)  # [L,1,C]
        heads[name], momenta[name] = (w, b), (torch.zeros_like(w), torch.zeros_like(b))  # w: [L,Din,C]
    order, pos = torch.randperm(len(labels), generator=g), 0
    for it in tqdm(range(iters), desc="linear heads", leave=False):
        if pos + batch_size > len(labels):  # reshuffle each epoch, drop the last incomplete batch
            order, pos = torch.randperm(len(labels), generator=g), 0
        idx, pos = order[pos:pos + batch_size], pos + batch_size
        xs = linear_inputs(cls[idx].to(device), avgpool[idx].to(device), n_blocks_list)
        y = labels[idx].to(device).repeat(len(lrs))  # [L*B]
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * it / iters))  # cosine schedule, [L,1,1]
        for name, (w, b) in heads.items():
            logits = torch.baddbmm(b, xs[name].expand(len(lrs), -1, -1), w)  # [L,B,Din] @ [L,Din,C] -> [L,B,C]
            # sum over heads of each head's mean cross-entropy: the heads' gradients stay independent
            loss = F.cross_entropy(logits.flatten(0, 1), y, reduction="sum") / batch_size
            grads = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():  # SGD with momentum (torch.optim.SGD semantics), one lr per head
                for p, buf, grad in zip((w, b), momenta[name], grads):
                    buf.mul_(momentum).add_(grad)
                    p.sub_(step_lr * buf)
    return {name: (w.detach(), b.detach()) for name, (w, b) in heads.items()}


@torch.no_grad()
def grid_accuracy(heads, cls, avgpool, labels, n_blocks_list, chunk=4096):
    """Top-1 accuracy (%) of every head: {variant: [L]}."""
    device = next(iter(heads.values()))[0].device
    correct = {name: torch.zeros(w.shape[0], device=device) for name, (w, _) in heads.items()}
    for i in range(0, len(labels), chunk):
        xs = linear_inputs(cls[i:i + chunk].to(device), avgpool[i:i + chunk].to(device), n_blocks_list)
        y = labels[i:i + chunk].to(device)
        for name, (w, b) in heads.items():
            logits = torch.baddbmm(b, xs[name].expand(w.shape[0], -1, -1), w)  # [L,B,C]
            correct[name] += (logits.argmax(-1) == y).sum(1)  # [L]
    return {name: (100.0 * c / max(1, len(labels))).cpu() for name, c in correct.items()}


def run_linear(backbone, cfg, device):
    train_set, test_set = load_splits(cfg)
    check_image_size(backbone, cfg.image_size)
    start = time.time()
    n_max = min(max(cfg.linear_n_blocks), backbone.n_blocks)
    n_blocks_list = sorted({min(n, n_max) for n in cfg.linear_n_blocks})  # a 3-block model has no "last 4 blocks"
    extract = partial(linear_features, backbone, image_size=cfg.image_size, n_blocks=n_max,
                      batch_size=cfg.batch_size, device=device, num_workers=cfg.num_workers)
    train_cls, train_avg, train_y = extract(train_set)  # [N,n,D], [N,D], [N]
    test_cls, test_avg, test_y = extract(test_set)
    print(f"features of {len(train_y)} + {len(test_y)} images in {time.time() - start:.0f} s; training "
          f"{2 * len(n_blocks_list)} variants x {len(cfg.linear_lrs)} learning rates together")
    # held-out split of the training set picks the grid point; the test set is looked at once, for that point
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(cfg.linear_val_fraction * len(train_y))))
    val, fit = perm[:n_val], perm[n_val:]
    heads = train_linear_grid(train_cls[fit], train_avg[fit], train_y[fit], n_blocks_list, int(train_y.max()) + 1,
                              cfg.linear_lrs, cfg.linear_iters, cfg.linear_batch_size, cfg.linear_momentum,
                              cfg.seed, device)
    val_acc = grid_accuracy(heads, train_cls[val], train_avg[val], train_y[val], n_blocks_list)
    best_name, best_l = max(((n, l) for n in val_acc for l in range(len(cfg.linear_lrs))),
                            key=lambda nl: val_acc[nl[0]][nl[1]].item())
    w, b = heads[best_name]
    best_head = {best_name: (w[best_l:best_l + 1], b[best_l:best_l + 1])}
    test_top1 = grid_accuracy(best_head, test_cls, test_avg, test_y, n_blocks_list)[best_name][0].item()
    grid = [{"variant": n, "lr": cfg.linear_lrs[l], "val_top1": val_acc[n][l].item()}
            for n in val_acc for l in range(len(cfg.linear_lrs))]
    if best_l in (0, len(cfg.linear_lrs) - 1) and len(cfg.linear_lrs) > 1:
        print(f"note: the best learning rate {cfg.linear_lrs[best_l]} is at the edge of the grid; widen --linear_lrs")
    return {"n_fit": len(fit), "n_val": n_val, "n_test": len(test_y),
            "best": {"variant": best_name, "lr": cfg.linear_lrs[best_l], "val_top1": val_acc[best_name][best_l].item(),
                     "test_top1": test_top1}, "grid": grid}


# ---------------------------------------------------------------------------------------------------------------
# Instance retrieval / copy detection (Sec. 7.3, Sec. 3): find each original from its edited copies
# ---------------------------------------------------------------------------------------------------------------
def make_copy(img, strength, rng):
    """An edited copy of a PIL image; every edit grows with strength in [0,1], 0 returns the image unchanged.
    Edits of copy-detection benchmarks (DISC21): crop, resize, colour change, overlaid text, pasted patch, JPEG."""
    if strength <= 0:
        return img.copy()
    img = img.convert("RGB")
    w, h = img.size
    keep = 1 - 0.5 * strength  # crop keeps this fraction of each side
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    scale = 1 + strength * rng.uniform(-0.5, 0.5)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(1 + strength * rng.uniform(-0.6, 0.6))
    w, h = img.size
    draw = ImageDraw.Draw(img)
    text = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(8))
    font_px = round(0.25 * h * strength)  # text height grows with the edit; below 4 px it would not be text
    if font_px >= 4:
        draw.text((rng.randint(0, w // 2), rng.randint(0, h - h // 4)), text,
                  font=ImageFont.load_default(size=font_px), fill=tuple(rng.randrange(256) for _ in range(3)))
    pw, ph = round(w * 0.5 * strength ** 0.5), round(h * 0.5 * strength ** 0.5)  # patch covers 25% * strength
    if pw and ph:
        px, py = rng.randint(0, w - pw), rng.randint(0, h - ph)
        draw.rectangle((px, py, px + pw - 1, py + ph - 1), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=round(95 - 80 * strength))  # re-encode: blocking and colour loss
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def to_pil(img):
    """[3,H,W] float in [0,1] -> PIL RGB."""
    return Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def to_tensor(pil):
    """PIL -> [3,H,W] float in [0,1]."""
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


class ListDataset(Dataset):
    """(image [3,H,W] in [0,1], label) pairs held in memory, the format extract_features expects."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def retrieval_metrics(query_feats, db_feats, gt):
    """Each query (a copy) has one relevant database image (its original), so its average precision is the
    reciprocal of the original's rank. query_feats [Q,D], db_feats [M,D] L2-normalised, gt [Q] database indices."""
    sim = query_feats @ db_feats.T  # [Q,M] cosine similarity
    true_sim = sim.gather(1, gt[:, None])  # [Q,1]
    rank = (sim > true_sim).sum(1) + 1  # [Q]; ties count in the query's favour
    others = sim.scatter(1, gt[:, None], -2.0).max(1).values  # [Q] most similar non-original
    return {"mAP": (1.0 / rank).mean().item(), "recall@1": (rank <= 1).float().mean().item(),
            "recall@10": (rank <= 10).float().mean().item(), "sim_to_original": true_sim.median().item(),
            "sim_to_best_other": others.median().item()}


def run_retrieval(backbone, cfg, device):
    dataset = build_dataset(cfg.test_data or cfg.data, train=False)
    check_image_size(backbone, cfg.image_size)
    n_orig = min(cfg.retrieval_originals, len(dataset) // 2)
    n_db = min(n_orig + cfg.retrieval_distractors, len(dataset))
    originals = [dataset[i][0] for i in range(n_orig)]  # [3,H,W] in [0,1]
    extract = partial(extract_features, backbone, image_size=cfg.image_size, batch_size=cfg.batch_size,
                      device=device, num_workers=cfg.num_workers)
    db_feats, _ = extract(ListDataset(originals + [dataset[i][0] for i in range(n_orig, n_db)], list(range(n_db))))
    rng = random.Random(cfg.seed)
    rows = []
    for strength in cfg.retrieval_strengths:
        copies, gt = [], []
        for i, img in enumerate(originals):
            for _ in range(cfg.retrieval_copies):
                copies.append(to_tensor(make_copy(to_pil(img), strength, rng)))
                gt.append(i)
        query_feats, gt = extract(ListDataset(copies, gt))
        rows.append({"strength": strength, **retrieval_metrics(query_feats, db_feats, gt)})
    return {"n_originals": n_orig, "n_distractors": n_db - n_orig, "n_queries_per_strength": n_orig *
            cfg.retrieval_copies, "retrieval": rows}


# ---------------------------------------------------------------------------------------------------------------
# Pictures (Sec. 7.5): PCA of patch features as RGB, class-token attention per head; PNGs at the image's size
# ---------------------------------------------------------------------------------------------------------------
def fed_size(height, width, short_side, patch):
    """(h, w) px fed to the backbone: shorter side -> short_side, aspect kept, both rounded to whole patches."""
    scale = short_side / min(height, width)
    return (max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch))


def load_picture(path):
    """An image file, or "fashion-mnist:<i>" for test image i of Fashion-MNIST -> [3,H,W] in [0,1]."""
    if str(path).startswith("fashion-mnist:"):
        return build_dataset("fashion-mnist", train=False)[int(str(path).split(":")[1])][0]
    with Image.open(path) as im:
        return to_tensor(im)


def picture_name(path):
    return Path(str(path).replace(":", "_")).stem  # fashion-mnist:19 -> fashion-mnist_19


def prepare_picture(img, short_side, patch):
    """[3,H,W] in [0,1] -> normalised [1,3,h,w] with h, w multiples of the patch size (said, not silent)."""
    h, w = fed_size(*img.shape[-2:], short_side, patch)
    print(f"{tuple(img.shape[-2:])} px image fed at {h}x{w} px = {h // patch}x{w // patch} patches of {patch} px")
    return normalize(resize(img, (h, w)))[None]


@torch.no_grad()
def patch_grid(backbone, x):
    """x [1,3,h,w] -> final-norm patch tokens as a grid [h/p, w/p, D] (x_norm_patchtokens, row-major)."""
    p = backbone.patch_size
    tokens = backbone.forward_features(x)["x_norm_patchtokens"][0]  # [N,D]
    return tokens.reshape(x.shape[-2] // p, x.shape[-1] // p, -1).float().cpu()  # [N,D] -> [h,w,D]


def principal_components(x, k):
    """x [M,D] -> projections on the first k principal components [M,k] (sign as SVD returns it)."""
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # rows of v: components, by decreasing variance
    return x @ v[:k].T  # [M,D] @ [D,k] -> [M,k]


def pca_rgb(grids, threshold=0.0):
    """The paper's PCA picture for a set of images (Sec. 7.5): one PCA over the patches of all images; patches whose
    first component exceeds `threshold` standard deviations are foreground; a second PCA over the foreground only
    gives three components, min-max scaled to [0,1] as RGB; background black. The sign of a component is arbitrary:
    the first is flipped so that image borders are mostly background (objects rarely fill the frame).
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
        out.append((rgb[start:start + h * w].reshape(h, w, 3), fg[start:start + h * w].reshape(h, w)))
        start += h * w
    return out


def _border_mask(h, w):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


@torch.no_grad()
def cls_attention(backbone, x):
    """x [1,3,h,w] -> attention of the class token to every patch, per head of the last block [H, h/p, w/p]
    (registers dropped: the token order is cls, registers, patches)."""
    p, r = backbone.patch_size, backbone.num_register_tokens
    attn = backbone.get_last_selfattention(x)[0]  # [H,1+R+N,1+R+N]
    return attn[:, 0, 1 + r:].reshape(-1, x.shape[-2] // p, x.shape[-1] // p).float().cpu()  # [H,N] -> [H,h,w]


def upsample(grid, height, width):
    """[h,w,C] patch grid -> [height,width,C], nearest: each patch stays a visible block of the image's size."""
    return F.interpolate(grid.permute(2, 0, 1)[None], size=(height, width), mode="nearest")[0].permute(1, 2, 0)


def heat(m):
    """[h,w] -> [h,w,3] black-red-yellow-white colour map of the min-max scaled values."""
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
    return torch.stack([(3 * m).clamp(0, 1), (3 * m - 1).clamp(0, 1), (3 * m - 2).clamp(0, 1)], dim=-1)


def save_png(rgb, path):
    """[H,W,3] in [0,1] -> PNG."""
    Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().numpy()).save(path)
    return str(path)


def run_pca(backbone, cfg, device, images, out_dir):
    pictures = [load_picture(p) for p in images]
    grids = [patch_grid(backbone, prepare_picture(img, cfg.picture_size, backbone.patch_size).to(device))
             for img in pictures]
    written, pcas = [], []
    for path, img, (rgb, fg) in zip(images, pictures, pca_rgb(grids, cfg.pca_threshold)):
        pcas.append(upsample(rgb, *img.shape[-2:]))  # [H,W,3], the image's own size
        written.append(save_png(pcas[-1], out_dir / f"{picture_name(path)}_pca.png"))
        print(f"{written[-1]}: foreground {100 * fg.float().mean():.0f}% of patches")
    sheet = pca_sheet(pictures, pcas, cfg.sheet_height)
    return {"pngs": written, "sheet": save_png(sheet, out_dir / f"{picture_name(images[0])}_pca_sheet.png")}


def pca_sheet(pictures, pcas, height):
    """Inputs on top, their PCA pictures below, each scaled to `height` px tall, aspect kept (as in Fig. 1).
    Small images are enlarged with nearest (pixels stay sharp), large ones shrunk with antialiasing."""
    def scaled(rgb):  # [H,W,3] -> [height, W*height/H, 3]
        h, w = rgb.shape[:2]
        size, x = (height, max(1, round(w * height / h))), rgb.permute(2, 0, 1)[None]
        x = F.interpolate(x, size=size, mode="nearest") if h < height else \
            F.interpolate(x, size=size, mode="bilinear", antialias=True)
        return x[0].permute(1, 2, 0)
    top = torch.cat([scaled(p.permute(1, 2, 0)) for p in pictures], dim=1)  # [height, sum W, 3]
    bottom = torch.cat([scaled(p) for p in pcas], dim=1)
    return torch.cat([top, bottom], dim=0)  # [2*height, sum W, 3]


def run_attention(backbone, cfg, device, images, out_dir):
    written = []
    for path in images:
        img = load_picture(path)
        maps = cls_attention(backbone, prepare_picture(img, cfg.picture_size, backbone.patch_size).to(device))
        for h, m in enumerate(maps):
            png = out_dir / f"{picture_name(path)}_attn_head{h}.png"
            written.append(save_png(upsample(heat(m), *img.shape[-2:]), png))
    print(f"wrote {len(written)} PNGs (one per head and image) to {out_dir}")
    return {"pngs": written}


# ---------------------------------------------------------------------------------------------------------------
# Main: load, run one command, print a table, write JSON beside the checkpoint
# ---------------------------------------------------------------------------------------------------------------
COMMANDS = ("knn", "linear", "retrieval", "pca", "attention")


def print_table(rows):
    if not rows:
        return
    cols = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main(argv=None):
    command, checkpoint, images, cfg = parse_config(argv)
    print(f"eval.py {command} {checkpoint}\nconfig: {json.dumps(asdict(cfg))}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    backbone = load_model(checkpoint).to(device).eval()
    out_dir = Path(cfg.out) if cfg.out else Path(checkpoint).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if command == "knn":
        results = run_knn(backbone, cfg, device)
        print_table(results["knn"])
    elif command == "linear":
        results = run_linear(backbone, cfg, device)
        print_table([max((r for r in results["grid"] if r["variant"] == v), key=lambda r: r["val_top1"])
                     for v in dict.fromkeys(r["variant"] for r in results["grid"])])  # best lr per variant
        print_table([results["best"]])
    elif command == "retrieval":
        results = run_retrieval(backbone, cfg, device)
        print_table(results["retrieval"])
    elif command == "pca":
        results = run_pca(backbone, cfg, device, images, out_dir)
    else:
        results = run_attention(backbone, cfg, device, images, out_dir)
    seconds = time.time() - start
    print(f"{command} took {seconds:.1f} s on {device}")
    json_path = Path(checkpoint).with_name(f"{Path(checkpoint).stem}_eval_{command}.json")
    json_path.write_text(json.dumps({"command": command, "checkpoint": str(checkpoint), "config": asdict(cfg),
                                     "seconds": seconds, "results": results}, indent=1))
    print(f"results -> {json_path}")
    return results


if __name__ == "__main__":
    main()
