"""Evaluate a frozen DINOv2 backbone: k-NN, linear probe, copy retrieval, pictures of what it sees.

Any checkpoint that model.load_model reads works: ours (runs/<name>/teacher_backbone.pth, a train.py
checkpoint.pth, distill.py's <student>_backbone.pth) or a released one (dinov2_vits14_pretrain.pth).
Images are fed at the checkpoint's own training size (its position embedding's, e.g. 28 px for
train.py's tiny preset), at most the paper's 224 px, unless --image_size says otherwise. Each
command prints a small table and writes <checkpoint stem>_eval_<command>.json, and the pictures, to
--out (default: beside the checkpoint); a folder it cannot write to is an error before any work.
`baselines` takes no checkpoint: it measures train.py's untrained network (--train_preset) and raw
pixels, and writes <train_preset>_init_eval_baselines.json to --out (default: runs/).

Run:
    python eval.py knn runs/tiny/teacher_backbone.pth --preset tiny     # Fashion-MNIST 60k / 10k
    python eval.py linear runs/tiny/teacher_backbone.pth --preset tiny
    python eval.py retrieval runs/tiny/teacher_backbone.pth --preset tiny
    python eval.py pca runs/tiny/teacher_backbone.pth fashion-mnist:19 fashion-mnist:2   # test images
    python eval.py pca dinov2_vits14_pretrain.pth a.jpg b.jpg    # one PCA over both (Fig. 1 style)
    python eval.py attention dinov2_vits14_pretrain.pth a.jpg    # input, mean and every head
    python eval.py knn dinov2_vits14_pretrain.pth --data /data/imagenet  # train/, val/ class folders
    python eval.py baselines     # k-NN of raw pixels and of train.py's tiny net at initialisation
    python eval.py --help                                        # every flag, default and type
Every field of EvalConfig is a flag, one convention for every script (cli.py: --knn_ks 10,20).
The preset "tiny" (PRESETS) only sizes the work for a 28-px model on a CPU. What each command
reaches, and in how long, is in the README's results table beside the command that measured it.

Paper (arXiv 2304.07193) -> code
    Sec. 6.1 Table 1 k-NN column (DINO protocol:       -> run_knn, knn_rows (votes: data.knn_classify)
        k in {10,20,100,200}, T=0.07)
    (ours) the k-NN a pretrained backbone must beat:   -> pixel_features, initial_backbone,
        raw pixels, the same network at initialisation    run_baselines
    Sec. 7.1 Table 4 linear probe; App. B.3 grid over  -> linear_features, linear_inputs,
        blocks x avgpool x lr                              train_linear_grid, run_linear
    Sec. 7.3 Table 9 instance recognition; Sec. 3 copy -> make_copy, retrieval_metrics, run_retrieval
        detection for dedup; Sec. 6.4 Table 3 (KoLeo
        helps retrieval most)
    Sec. 7.5 Fig. 1 PCA of patch features; class-token -> visualize.py: run_pca, run_attention
        attention per head of the last block (DINO v1)

Deviations from the paper (also in the README):
    linear: features computed once on centre crops (no random-resized-crop / flip while training
        the heads, the backbone never runs in the loop); the grid point is chosen on a held-out part
        of the training set and its test accuracy reported (the paper reports the best grid point
        on the validation set itself).
    retrieval: the Oxford/Paris/Met benchmarks of Sec. 7.3 need downloads; we measure copy detection
        on edited copies of whatever images are at hand (edits of the DISC21 benchmark that Sec. 3's
        dedup model was trained for).
    pictures: the paper gives neither the threshold nor the sign of the first PC; see
        visualize.pca_rgb.

Shape legend: B batch, N tokens (patches), D width, C classes, L learning rates, Q queries,
M database images.
"""
import io
import json
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from torch.utils.data import DataLoader, Dataset

import cli
import train
from augment import resize
from cli import at_least, in_range, one_of
from data import MapDataset, build_dataset, eval_transform, extract_features, knn_classify, subset
from model import load_model
from runtime import progress
from visualize import run_attention, run_pca, to_pil, to_tensor


# ---------------------------------------------------------------------------------------------------------------
# Configuration: defaults are the paper's / released evaluation code's values
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    # --- data
    data: str = "fashion-mnist"  # labelled train split: fashion-mnist, or a folder of IDX files or images
    test_data: str = ""  # test split; "" = build_dataset(data, train=False) (val/ or test/ in data)
    n_train: int = 0  # (ours) a fixed random subset of this many training images; 0 = all
    n_test: int = 0  # (ours) the same for the test split (studies.py evaluates many short runs)
    image_size: int = 0  # px side fed, a patch multiple; 0 = the training size, at most 224 (paper)
    batch_size: int = 256  # images per forward pass when extracting features (official knn.py: 256)
    num_workers: int = 0  # DataLoader workers for feature extraction
    device: str = "auto"  # "auto" = cuda when available, else cpu; or cpu, cuda, cuda:1, mps
    seed: int = 0  # held-out split, head init, copy edits, the baselines' network init
    out: str = ""  # folder for the JSON and PNGs; "" = beside the checkpoint (baselines: runs)
    # --- k-NN (Sec. 6.1, protocol of DINO v1 / the released eval/knn.py)
    knn_ks: tuple = (10, 20, 100, 200)  # numbers of neighbours voting
    knn_temperature: float = 0.07  # T in the vote weights softmax(similarity / T)
    # --- baselines (ours): k-NN of raw pixels and of a network at initialisation
    train_preset: str = "tiny"  # train.py preset (or paper) whose untrained network is measured
    # --- linear probe (Sec. 7.1, App. B.3; values of the released eval/linear.py)
    linear_n_blocks: tuple = (1, 4)  # class tokens of the last n blocks, concatenated
    linear_lrs: tuple = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
                         0.1)  # the grid; each is multiplied by batch / 256
    linear_batch_size: int = 1024  # global batch: official 128 per GPU x 8 GPUs
    linear_epochs: float = 10.0  # passes over the training features, lr cosine to 0 (official: 10)
    linear_momentum: float = 0.9  # SGD momentum, weight decay 0
    linear_val_fraction: float = 0.1  # ours: held-out part of train that picks the grid point
    # --- retrieval / copy detection (Sec. 7.3, Sec. 3)
    retrieval_originals: int = 200  # (ours) database images whose copies are searched for
    retrieval_distractors: int = 1800  # (ours) further database images that are never copied
    retrieval_copies: int = 2  # (ours) edited copies per original and strength (the queries)
    retrieval_strengths: tuple = (0.0, 0.25, 0.5, 1.0)  # (ours) edit strength in [0,1]; 0 = a copy
    # --- pictures (Sec. 7.5)
    picture_size: int = 0  # (ours) pca/attention: px shorter side; 0 = the training size, at most 448
    pca_threshold: float = 0.0  # (ours; the paper has none) foreground: first PC > this many std devs
    sheet_height: int = 160  # px height of each panel of the pca and attention sheets

    def __post_init__(self):
        self.check()

    def check(self):
        at_least("image_size", self.image_size, 0)
        at_least("batch_size", self.batch_size, 1)
        at_least("n_train", self.n_train, 0)
        at_least("n_test", self.n_test, 0)
        at_least("num_workers", self.num_workers, 0)
        if self.device != "auto" and not self.device.startswith(DEVICES):
            one_of("device", self.device, ("auto",) + DEVICES)
        at_least("knn_ks", self.knn_ks, 1)
        at_least("knn_temperature", self.knn_temperature, 1e-6)
        one_of("train_preset", self.train_preset, ("paper", *train.PRESETS))
        at_least("linear_n_blocks", self.linear_n_blocks, 1)
        at_least("linear_lrs", self.linear_lrs, 0.0)
        at_least("linear_batch_size", self.linear_batch_size, 1)
        at_least("linear_epochs", self.linear_epochs, 0.0)
        in_range("linear_momentum", self.linear_momentum, 0.0, 1.0)
        in_range("linear_val_fraction", self.linear_val_fraction, 0.0, 0.9)
        at_least("retrieval_originals", self.retrieval_originals, 1)
        at_least("retrieval_distractors", self.retrieval_distractors, 0)
        at_least("retrieval_copies", self.retrieval_copies, 1)
        in_range("retrieval_strengths", self.retrieval_strengths, 0.0, 1.0)
        at_least("picture_size", self.picture_size, 0)
        at_least("sheet_height", self.sheet_height, 16)


DEVICES = ("cpu", "cuda", "mps")  # torch device names; "cuda:1" is cuda's second GPU

# Named overrides of EvalConfig for --preset, the same concept as train.PRESETS (cli.parse_config
# reads both). The image size comes from the checkpoint, so a preset only sizes the work: "tiny" is
# for a backbone of train.py's tiny preset on Fashion-MNIST (28 px), on a CPU.
PRESETS = {
    # larger feature batches (28 px images are cheap), smaller sheet panels, and the lr grid goes on
    # to 1.0 in case small features want larger steps than ImageNet's
    "tiny": dict(batch_size=512, linear_lrs=EvalConfig.linear_lrs + (0.2, 0.5, 1.0), sheet_height=112),
}
COMMANDS = ("knn", "linear", "retrieval", "pca", "attention", "baselines")
PICTURES = ("pca", "attention")  # the commands that take images


def parse_config(argv=None):
    """`python eval.py <command> [checkpoint] [images] --field value` -> (cfg, args) with
    args.command, args.checkpoint (None for baselines), args.images. One convention for every
    script (cli.py)."""
    positionals = [("command", "what to measure or draw", dict(choices=COMMANDS)),
                   ("checkpoint", "anything model.load_model reads (.pth/.pt); none for baselines",
                    dict(nargs="?")),
                   ("images", "pca / attention: image files, or fashion-mnist:<test index>",
                    dict(nargs="*"))]
    cfg, args = cli.parse_config(EvalConfig, argv, presets=PRESETS, positionals=positionals,
                                 description=__doc__.split("\n\n")[0], prog="eval.py")
    if args.command == "baselines" and args.checkpoint:
        cli.error(f"baselines takes no checkpoint, got {args.checkpoint}: it measures raw pixels "
                  f"and the untrained network of --train_preset", "eval.py")
    if args.command != "baselines" and not args.checkpoint:
        cli.error(f"{args.command} needs a checkpoint (anything model.load_model reads)", "eval.py")
    if args.command in PICTURES and not args.images:
        cli.error(f"{args.command} needs at least one image (a file, or fashion-mnist:<index>)",
                  "eval.py")
    if args.command not in PICTURES and args.images:
        cli.error(f"{args.command} takes no images, got {args.images}", "eval.py")
    return cfg, args


def resolve_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def trained_size(backbone):
    """px side the backbone was trained at: its position embedding's grid times the patch size (28
    for the tiny preset, 518 for released models, as in the checkpoint's sidecar JSON)."""
    return math.isqrt(backbone.pos_embed.shape[1] - 1) * backbone.patch_size


def default_sizes(cfg, backbone):
    """0 in image_size / picture_size -> the training size, capped at the paper's 224 / 448 px."""
    size = trained_size(backbone)
    return replace(cfg, image_size=cfg.image_size or min(size, 224),
                   picture_size=cfg.picture_size or min(size, 448))


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
    return {"n_train": len(train_feats), "n_test": len(test_feats), "n_classes": int(train_labels.max()) + 1,
            "knn": knn_rows((train_feats, train_labels), (test_feats, test_labels), cfg)}


def knn_rows(train_split, test_split, cfg):
    """(feats [N,D] L2-normalised, labels [N]) of each split -> [{"k", "top1", "top5"}] for each of
    cfg.knn_ks, in %."""
    results = knn_classify(*train_split, *test_split, ks=cfg.knn_ks, temperature=cfg.knn_temperature)
    n_classes = int(train_split[1].max()) + 1
    rows = []
    for k in cfg.knn_ks:
        row = {"k": k, "top1": results[k]["top1"]}
        if n_classes > 5:  # top-5 of 5 classes or fewer is 100% by construction
            row["top5"] = results[k]["top5"]
        rows.append(row)
    return rows


def load_splits(cfg):
    """(train, test) datasets whose labels share one class-to-index map."""
    train_set = build_dataset(cfg.data, train=True)
    test_set = build_dataset(cfg.test_data or cfg.data, train=False)
    if getattr(train_set, "paths", None) is not None and train_set.paths == getattr(test_set, "paths", None):
        raise ValueError(f"{cfg.data} has no train/ and val/ (or test/) sub-folders: pass --test_data <folder>")
    shared_class_index(train_set, test_set)  # before any feature is computed
    return subset(train_set, cfg.n_train, cfg.seed), subset(test_set, cfg.n_test, cfg.seed)


def shared_class_index(train_set, test_set):
    """Image folders number their own class sub-folders (sorted), so when train/ and val/ hold
    different folders the same index would mean different classes in each ("c" in val would get
    train's "b"). Renumber both from the sorted union of the names, in place, and say which classes
    only one split has: a class missing from train/ is never predicted, its test images count wrong."""
    train_classes = getattr(train_set, "classes", None)
    test_classes = getattr(test_set, "classes", None)
    if train_classes is None or test_classes is None or list(train_classes) == list(test_classes):
        return
    union = sorted(set(train_classes) | set(test_classes))
    for dataset in (train_set, test_set):
        index = np.array([union.index(c) for c in dataset.classes] + [-1])  # [C+1]; -1 stays -1
        dataset.labels = index[dataset.labels]
        dataset.classes = union
    only_train = sorted(set(train_classes) - set(test_classes))
    only_test = sorted(set(test_classes) - set(train_classes))
    print(f"note: train and test class folders differ; labels follow the union of {len(union)} "
          f"names (only in train: {only_train or 'none'}; only in test: {only_test or 'none'})")


# ---------------------------------------------------------------------------------------------------------------
# Baselines (ours): what k-NN reaches with no pretraining, on the same splits and at the same image size
# ---------------------------------------------------------------------------------------------------------------
def initial_backbone(cfg):
    """The teacher backbone of train.py's preset cfg.train_preset as a run with seed cfg.seed starts:
    train.build_student_teacher after torch.manual_seed."""
    train_cfg = replace(train.Config(**train.PRESETS.get(cfg.train_preset, {})), seed=cfg.seed)
    torch.manual_seed(train_cfg.seed)
    _, teacher, _ = train.build_student_teacher(train_cfg)
    return teacher.backbone


def pixel_features(dataset, size):
    """Raw pixels as features: each image [3,H,W] in [0,1] at size x size px (resized if it is not),
    flattened and L2-normalised, so that k-NN compares them by cosine as it compares class tokens.
    A grey image's three equal channels give the cosine of its grey pixels.
    -> (feats [N,3*size*size], labels [N]); on a large image set, --n_train / --n_test bound N.
    """
    feats = torch.empty(len(dataset), 3 * size * size)
    labels = torch.empty(len(dataset), dtype=torch.long)
    for i in range(len(dataset)):
        img, labels[i] = dataset[i]
        feats[i] = resize(img, (size, size)).flatten()  # [3,size,size] -> [3*size*size]
    return F.normalize(feats, dim=-1), labels


def run_baselines(backbone, cfg, device):
    """k-NN of raw pixels and of `backbone` (the untrained network, initial_backbone) -> rows per k."""
    train_set, test_set = load_splits(cfg)
    check_image_size(backbone, cfg.image_size)
    features = {"raw pixels": partial(pixel_features, size=cfg.image_size),
                f"{cfg.train_preset} at init": partial(
                    extract_features, backbone, image_size=cfg.image_size, batch_size=cfg.batch_size,
                    device=device, num_workers=cfg.num_workers)}
    rows = []
    for name, extract in features.items():
        splits = extract(train_set), extract(test_set)  # (feats [N,D], labels [N]) each
        rows += [{"features": name, **row} for row in knn_rows(*splits, cfg)]
    return {"n_train": len(train_set), "n_test": len(test_set), "knn": rows}


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
    for x, y in progress(loader, desc="features", leave=False, disable=len(loader) < 2):
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
    A training set smaller than the batch is one batch, and the lr is scaled by that smaller batch.
    -> {variant: (weight [L,Din,C], bias [L,1,C])}."""
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(labels))
    lr = torch.tensor(lrs, dtype=torch.float32, device=device).view(-1, 1, 1) * batch_size / 256  # [L,1,1]
    heads, momenta = {}, {}
    for name, x in linear_inputs(cls[:1], avgpool[:1], n_blocks_list).items():
        w = (torch.randn(len(lrs), x.shape[1], num_classes, generator=g) * 0.01).to(device).requires_grad_()
        b = torch.zeros(len(lrs), 1, num_classes, device=device, requires_grad=True)  # [L,1,C]
        heads[name], momenta[name] = (w, b), (torch.zeros_like(w), torch.zeros_like(b))  # w: [L,Din,C]
    order, pos = torch.randperm(len(labels), generator=g), 0
    for it in progress(range(iters), desc="linear heads", leave=False):
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
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    # held-out split of the training set picks the grid point; the test set is looked at once, for that point
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(round(cfg.linear_val_fraction * len(train_y))))
    val, fit = perm[:n_val], perm[n_val:]
    iters = linear_iterations(len(fit), cfg.linear_epochs, cfg.linear_batch_size)
    print(f"features of {len(train_y)} + {len(test_y)} images in {time.time() - start:.0f} s; "
          f"training {2 * len(n_blocks_list)} variants x {len(cfg.linear_lrs)} learning rates "
          f"together: {iters} steps of {min(cfg.linear_batch_size, len(fit))} = "
          f"{cfg.linear_epochs:g} epochs of {len(fit)} features")
    heads = train_linear_grid(train_cls[fit], train_avg[fit], train_y[fit], n_blocks_list, n_classes,
                              cfg.linear_lrs, iters, cfg.linear_batch_size, cfg.linear_momentum,
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
    return {"n_fit": len(fit), "n_val": n_val, "n_test": len(test_y), "iterations": iters,
            "best": {"variant": best_name, "lr": cfg.linear_lrs[best_l], "val_top1": val_acc[best_name][best_l].item(),
                     "test_top1": test_top1}, "grid": grid}


def linear_iterations(n_train, epochs, batch_size):
    """SGD steps for `epochs` passes over n_train features. The official probe runs 10 epochs of
    1,250 steps at a global batch of 1,024 (128 per GPU x 8): 12.8M samples, 10 passes over
    ImageNet's 1.28M images. Counting passes, not steps, keeps that amount on any dataset."""
    return max(1, math.ceil(epochs * n_train / min(batch_size, n_train)))


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
# Main: load, run one command, print a table, write JSON beside the checkpoint
# ---------------------------------------------------------------------------------------------------------------
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
    cfg, args = parse_config(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None  # None: baselines
    out_dir = Path(cfg.out or (checkpoint.parent if checkpoint else "runs"))
    check_writable(out_dir)  # before the work, not after it
    backbone = load_backbone(checkpoint) if checkpoint else initial_backbone(cfg)
    settings = cli.describe_overrides(cfg, args.preset, PRESETS, EvalConfig)
    cfg = default_sizes(cfg, backbone)  # derived from the backbone, printed in the config line
    what = (f"{checkpoint}: {settings}; trained at" if checkpoint else
            f"train.py preset {cfg.train_preset} at initialisation: {settings}; built for")
    print(f"eval.py {args.command} {what} {trained_size(backbone)} px")
    print(f"config: {json.dumps(asdict(cfg))}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    backbone = backbone.to(device).eval()
    start = time.time()
    if args.command == "knn":
        results = run_knn(backbone, cfg, device)
        print_table(results["knn"])
    elif args.command == "linear":
        results = run_linear(backbone, cfg, device)
        print_table([max((r for r in results["grid"] if r["variant"] == v), key=lambda r: r["val_top1"])
                     for v in dict.fromkeys(r["variant"] for r in results["grid"])])  # best lr per variant
        print_table([results["best"]])
    elif args.command == "retrieval":
        results = run_retrieval(backbone, cfg, device)
        print_table(results["retrieval"])
    elif args.command == "baselines":
        results = run_baselines(backbone, cfg, device)
        print_table(results["knn"])
    elif args.command == "pca":
        results = run_pca(backbone, cfg, device, args.images, out_dir)
    else:
        results = run_attention(backbone, cfg, device, args.images, out_dir)
    seconds = time.time() - start
    print(f"{args.command} took {seconds:.1f} s on {device}")
    stem = checkpoint.stem if checkpoint else f"{cfg.train_preset}_init"
    json_path = out_dir / f"{stem}_eval_{args.command}.json"
    record = {"command": args.command, "checkpoint": str(checkpoint) if checkpoint else None,
              "preset": args.preset, "config": asdict(cfg), "seconds": seconds, "results": results}
    json_path.write_text(json.dumps(record, indent=1))
    print(f"results -> {json_path}")
    return results


def check_writable(folder):
    """Make the output folder and write a probe file into it (os.access says yes to root even on a
    read-only mount), so that a folder the results cannot go to is an error before minutes of work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".eval_write_test"):
            pass
    except OSError as e:
        cli.error(f"cannot write the results to {folder} ({e.strerror or e}): "
                  f"pass --out <a writable folder>", "eval.py")


def load_backbone(checkpoint):
    """model.load_model, its errors (not a checkpoint, not a backbone, wrong keys) as one line."""
    try:
        return load_model(checkpoint)
    except (OSError, ValueError, RuntimeError) as e:
        cli.error(str(e).splitlines()[0] if isinstance(e, ValueError) else str(e), "eval.py")


if __name__ == "__main__":
    main()
