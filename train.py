"""DINOv2 self-supervised pretraining (arXiv 2304.07193, Sec. 4-5, App. B) in one file, read top to bottom.

Student and teacher ViTs (model.py) see multi-crop views of unlabelled images; the student learns to predict the
teacher's prototype assignments of other views (DINO, image level) and of masked patches (iBOT, patch level), with
KoLeo spreading the features; the teacher is an EMA of the student (losses.py has the objectives).

Run (the same file from a laptop to a cluster):
    python train.py                                   # CPU demo: the named preset "tiny" on Fashion-MNIST, then
                                                      # the teacher's k-NN accuracy: 80.6% in 6.5-7.3 min on 2
                                                      # shared CPU cores (same net at init 67.9%, raw pixels 84.6%)
    python train.py --preset vit_l --data /path/imagenet --micro_batch_size 32        # one GPU
    torchrun --nproc_per_node=8 train.py --preset vit_l --data /path/imagenet          # one node
    torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --preset vit_g --fsdp true --data /path/images                        # several nodes
    python train.py ... --resume                      # continue exactly from output_dir/checkpoint.pth
    python train.py --bench                           # images/s and peak memory of a training step on this machine
    python train.py --baselines                       # k-NN of raw pixels and of the network at initialisation
The dataclass defaults are the paper's (ViT-g/14, App. B); `python train.py` without flags applies the preset
"tiny" (PRESETS), any --<field> VALUE overrides, and the resolved config is printed and stored in checkpoints.

Paper -> code
  Sec. 4 image-level objective (DINO) ............... teacher_targets, student_loss (losses.dino_loss)
  Sec. 4 patch-level objective (iBOT), masking ...... data.sample_masks, DinoV2.forward (losses.ibot_loss)
  Sec. 4 untied DINO / iBOT heads ................... DinoV2, build_student_teacher
  Sec. 4 Sinkhorn-Knopp centering (or EMA centering)  teacher_targets; the loop updates the center once per step
  Sec. 4 KoLeo regularizer (weight 0.1) ............. student_loss (losses.koleo_loss)
  Sec. 4 adapting the resolution (518 px at the end)  crop_size_at, Config.highres_*
  Sec. 5 FSDP, mixed precision, activation ckpt ..... wrap_student, autocast_for
  App. B multi-crop augmentation .................... data.MultiCropCollate (torch, no torchvision), make_loader
  App. B AdamW, lr/wd/momentum/temperature schedules  build_schedules, param_groups, set_hyperparameters
  App. B / Tab. 16 hyperparameters and model sizes .. Config, ARCHS, PRESETS
  DINO v1 weighted k-NN evaluation .................. knn_eval (data.extract_features, data.knn_classify)

Datasets, augmentation, masks and the k-NN scorer live in data.py (shared with distill.py, eval.py, curate.py).
Checkpoint (output_dir/checkpoint.pth, torch.load(weights_only=True) works): {"config", "model_args", "step",
"student"/"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}, "optimizer", "scaler", "centers", "rng", "data"};
at the end also teacher_backbone.pth (bare backbone, official keys) + teacher_backbone.json ({"model_args": ...}).

Shape legend: B batch, N tokens, D width, H heads, K prototypes, M masked patches, C classes.
"""
import argparse
import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (FashionMNIST, MultiCropCollate, SeededItems, StepBatchSampler, build_dataset, extract_features,
                  knn_classify, labelled_splits)
from losses import dino_loss, ibot_loss, is_dist, koleo_loss, sinkhorn_knopp, softmax_center, update_center
from model import DINOHead, DinoVisionTransformer

# ---------------------------------------------------------------------------------------------------------------
# Configuration: defaults are the paper's ViT-g/14 run (App. B, Tab. 16); named presets override a few fields
# ---------------------------------------------------------------------------------------------------------------
# One "epoch" in the official code is 1250 iterations whatever the dataset size; the paper's schedules are
# 625k iterations with a 100k warmup (= 500 and 80 such epochs). Here everything is counted in iterations.
@dataclass
class Config:
    # --- data and run
    data: str = "fashion-mnist"  # "fashion-mnist", a folder of its IDX files, or of images (paper: LVD-142M, Sec. 3)
    output_dir: str = "runs/dinov2"  # checkpoint.pth, metrics.jsonl, teacher_backbone.pth/.json
    seed: int = 0  # model init, data order, augmentations, drop path
    # --- model (Sec. 4, App. B)
    arch: str = "vit_giant2"  # key of ARCHS: vit_small | vit_base | vit_large | vit_giant2 | vit_tiny (CPU demo)
    patch_size: int = 14  # pixels per patch side (ViT-*/14)
    num_register_tokens: int = 0  # the paper's models have none; registers (Darcet et al. 2023) came later
    layerscale: float = 1e-5  # LayerScale init value (App. B); 0 = no LayerScale
    drop_path_rate: float = 0.4  # stochastic depth, student only (App. B, Tab. 16: 0.4 for L/g from scratch)
    drop_path_uniform: bool = True  # same rate in every block (official config)
    attn_impl: str = "auto"  # model.py attention path: auto | fused | explicit
    # --- heads (Sec. 4: untied DINO and iBOT heads; sizes of the official vitg14 config)
    n_prototypes: int = 131072  # K, prototypes of each head (official vitg14/vitl14 configs; default config 65536)
    head_hidden_dim: int = 2048  # MLP width of the heads
    head_bottleneck_dim: int = 384  # l2-normalised bottleneck before the prototypes (vitg14 config; default 256)
    head_nlayers: int = 3  # Linear-GELU-Linear-GELU-Linear
    # --- multi-crop and masking (Sec. 4, App. B)
    global_crop_size: int = 224  # px, 2 global crops
    local_crop_size: int = 98  # px (98 = 7 x 14)
    n_local_crops: int = 8
    global_crop_scale: tuple = (0.32, 1.0)  # RandomResizedCrop area fraction
    local_crop_scale: tuple = (0.05, 0.32)
    blur_sigma: tuple = (0.1, 2.0)  # px, Gaussian blur sigma range (kernel 9)
    mask_ratio: tuple = (0.1, 0.5)  # iBOT masked fraction of patches, spread uniformly across the batch
    mask_probability: float = 0.5  # fraction of global crops that are masked
    # --- losses and teacher targets (Sec. 4)
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1  # per global crop
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after warmup
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_iters: int = 37500  # 30 official epochs of 1250 iterations
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp (paper, Sec. 4, from SwAV) | ema (DINO centering)
    center_momentum: float = 0.9  # EMA centering only
    # --- optimisation (App. B)
    batch_size: int = 3072  # global batch (Tab. 16, L/g from scratch)
    micro_batch_size: int = 0  # images per device per forward; 0 = batch_size / world size (no accumulation)
    total_iters: int = 625000  # Tab. 16
    warmup_iters: int = 100000  # linear lr warmup (Tab. 16)
    base_lr: float = 2e-4  # lr for a batch of 1024; lr = base_lr * sqrt(batch / 1024) = 3.5e-4 at 3072 (Tab. 16)
    min_lr: float = 1e-6  # end of the cosine decay (official config)
    weight_decay: float = 0.04  # cosine 0.04 -> 0.2 (App. B)
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.994  # EMA momentum, cosine to 1 (App. B; the official default config uses 0.992)
    momentum_teacher_end: float = 1.0
    layerwise_decay: float = 0.9  # layer-wise lr decay (official default config; its vitg14 config uses 1.0)
    patch_embed_lr_mult: float = 0.2  # smaller lr for the patch embedding (official config)
    freeze_last_layer_iters: int = 1250  # prototypes frozen for the first (official) epoch
    clip_grad: float = 3.0  # gradient norm clip, applied to backbone and each head separately (official)
    adamw_betas: tuple = (0.9, 0.999)
    # --- adapting the resolution (Sec. 4): the last iterations at a larger global crop, pos-embed interpolated
    highres_iters: int = 10000
    highres_global_crop_size: int = 518
    # --- systems
    precision: str = "bf16"  # bf16 | fp16 (with GradScaler) | fp32 autocast; the paper trained in fp16 (App. B)
    fsdp: bool = False  # FSDP2 fully_shard instead of DDP (models that do not fit, ViT-g)
    activation_checkpointing: bool = False  # recompute each block in the backward pass (memory for compute)
    compile: bool = False  # torch.compile the student
    num_workers: int = 8  # DataLoader workers per process, each runs the batched augmentation (0 = in-process)
    # --- logging, evaluation, checkpoints
    log_every: int = 10  # iterations between metrics.jsonl lines / progress-bar updates
    eval_every: int = 0  # iterations between k-NN evaluations when the data has labels (0 = only at the end)
    knn_train_size: int = 10000  # training images used by the periodic k-NN (the final one uses all)
    checkpoint_every: int = 1000  # iterations between checkpoints (also written on SIGTERM/SIGUSR1 and at the end)
    resume: bool = False  # continue from output_dir/checkpoint.pth
    stop_after: int = 0  # stop (with a checkpoint) after this many iterations; 0 = run to total_iters


ARCHS = {  # model.vit_* widths / depths / heads (Tab. 1, App. B); vit_tiny is this repo's CPU demo
    "vit_tiny": dict(embed_dim=192, depth=4, num_heads=6),  # 1.8M parameters (2.9M with both heads)
    "vit_tiny_d2": dict(embed_dim=192, depth=2, num_heads=6),  # distill.py CPU demo students: half the depth,
    "vit_mini": dict(embed_dim=96, depth=4, num_heads=3),  # or half the width of vit_tiny
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}

PRESETS = {
    # App. B, Tab. 16. S/B/L are the paper's distillation rows (lr 1e-3 at batch 2048, no drop path, see
    # distill.py); used here to train from scratch. L/g from scratch: lr 3.5e-4 at batch 3072, drop path 0.4.
    "vit_s": dict(arch="vit_small", base_lr=1e-3 / math.sqrt(2), batch_size=2048, drop_path_rate=0.0,
                  n_prototypes=65536, head_bottleneck_dim=256),
    "vit_b": dict(arch="vit_base", base_lr=1e-3 / math.sqrt(2), batch_size=2048, drop_path_rate=0.0,
                  n_prototypes=65536, head_bottleneck_dim=256),
    "vit_l": dict(arch="vit_large", layerwise_decay=1.0),
    "vit_g": dict(layerwise_decay=1.0),  # = the dataclass defaults with the vitg14 config's layer-wise decay
    # CPU demo on Fashion-MNIST, 2 cores, ~10 minutes (README). Chosen by measurement on this 2-core machine:
    # 7-px patches (16 tokens) train ~2.4x faster than 4-px ones and reached 72% vs 66% k-NN after 200 steps;
    # width 192 beat 128, depth 6 did not beat 4; batch 64 x 800 steps beat 128 x 400 (78.3% vs 76.3%); teacher
    # momentum 0.98 beat 0.994/0.99 in runs this short; no LayerScale: with 1e-5 a fresh tiny net's [CLS] token
    # ignores the image. Paper augmentations kept (milder crops/blur did not help). Differences under ~1% between
    # these single-seed runs are noise (2000 steps at base lr 4e-3 gave 79.4%, this preset 80.6%).
    "tiny": dict(data="fashion-mnist", output_dir="runs/tiny", arch="vit_tiny", patch_size=7, layerscale=0.0,
                 drop_path_rate=0.0, n_prototypes=1024, head_hidden_dim=512, head_bottleneck_dim=128,
                 global_crop_size=28, local_crop_size=14, n_local_crops=4, batch_size=64, total_iters=1800,
                 warmup_iters=180, base_lr=2e-3, momentum_teacher=0.98, teacher_temp_warmup_iters=540,
                 freeze_last_layer_iters=50, layerwise_decay=1.0, highres_iters=0, num_workers=1,
                 checkpoint_every=600, log_every=20),
}


def config_parser(config_cls, presets, description):
    """--preset NAME (default "tiny") and one --<field> flag per dataclass field; unknown flags are an error."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default="tiny", choices=["paper", *presets],
                        help="named preset applied on top of the paper defaults ('paper' = none)")
    for f in fields(config_cls):
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", type=lambda v: v.lower() in ("1", "true", "yes"), nargs="?",
                                const=True, default=None)
        elif f.type is tuple or f.type == "tuple":
            parser.add_argument(f"--{f.name}", type=float, nargs=len(f.default), default=None)
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=None)
    return parser


def config_from_args(args, config_cls, presets):
    """The dataclass defaults, then the preset, then the flags given on the command line."""
    overrides = dict(presets.get(args.preset, {}))
    overrides.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items()
                      if k in {f.name for f in fields(config_cls)} and v is not None})
    return config_cls(**overrides)


def parse_config(argv=None):
    """Config from the command line -> (config, args) with args.bench / args.baselines for the other modes."""
    parser = config_parser(Config, PRESETS, "DINOv2 pretraining. Defaults: the paper's; no flags: the tiny CPU "
                                            "demo preset.")
    parser.add_argument("--bench", action="store_true", help="time training steps (tiny preset, ViT-S/14 b=8)")
    parser.add_argument("--baselines", action="store_true", help="k-NN of raw pixels and of the network at init")
    args = parser.parse_args(argv)
    return config_from_args(args, Config, PRESETS), args


# ---------------------------------------------------------------------------------------------------------------
# Student and teacher: backbone + untied DINO and iBOT heads (Sec. 4)
# ---------------------------------------------------------------------------------------------------------------
class DinoV2(nn.Module):
    """Backbone + DINO head (image level, on [CLS]) + iBOT head (patch level, on masked patches). The paper unties
    the two heads (Sec. 4, "Untying head weights between both objectives"). State-dict keys: backbone.*,
    dino_head.*, ibot_head.* (the official training-checkpoint layout)."""

    def __init__(self, backbone, dino_head, ibot_head):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops, local_crops, masks):
        """Student pass (through DDP/FSDP): one backbone pass per resolution; global crops masked (iBOT).
        -> class tokens of the global crops [2B,D], DINO logits [(2+n)B,K], iBOT logits [M,K]."""
        crops, crop_masks = [global_crops], [masks]
        if local_crops.shape[0]:
            crops, crop_masks = crops + [local_crops], crop_masks + [None]
        out = self.backbone(crops, masks=crop_masks, is_training=True)
        cls = torch.cat([o["x_norm_clstoken"] for o in out])  # [(2+n)B,D]
        patches = masked_tokens(out[0]["x_norm_patchtokens"], masks)  # [2B,N,D] -> [M,D]
        return out[0]["x_norm_clstoken"], self.dino_head(cls), self.ibot_head(patches)

    @torch.no_grad()
    def teacher_logits(self, global_crops, masks):
        """Teacher pass on the unmasked global crops -> DINO logits [2B,K], iBOT logits at the masked patches [M,K]."""
        out = self.backbone(global_crops, is_training=True)
        return self.dino_head(out["x_norm_clstoken"]), self.ibot_head(masked_tokens(out["x_norm_patchtokens"], masks))


def masked_tokens(patch_tokens, masks):
    """The patch tokens the iBOT loss sees: the masked ones [2B,N,D] -> [M,D]; all of them when masks is None
    (distillation, Sec. 5: no masking, iBOT on every patch of the global crops) -> [2B*N,D]."""
    return patch_tokens.flatten(0, 1) if masks is None else patch_tokens[masks]


def model_args_for(cfg, img_size=None):
    """DinoVisionTransformer kwargs of the teacher (no drop path), stored in checkpoints for load_model."""
    return dict(img_size=img_size or cfg.global_crop_size, patch_size=cfg.patch_size, **ARCHS[cfg.arch],
                init_values=cfg.layerscale or None, num_register_tokens=cfg.num_register_tokens)


def build_student_teacher(cfg):
    args = model_args_for(cfg)
    heads = lambda: [DINOHead(args["embed_dim"], cfg.n_prototypes, nlayers=cfg.head_nlayers,
                              hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim) for _ in "di"]
    student = DinoV2(DinoVisionTransformer(**args, drop_path_rate=cfg.drop_path_rate,
                                           drop_path_uniform=cfg.drop_path_uniform, attn_impl=cfg.attn_impl), *heads())
    teacher = DinoV2(DinoVisionTransformer(**args, attn_impl=cfg.attn_impl), *heads())  # no drop path (Sec. 4)
    teacher.load_state_dict(student.state_dict())  # the teacher starts as a copy of the student
    teacher.requires_grad_(False).eval()  # updated only by the EMA, never by gradients
    return student, teacher, args


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (DINO Sec. 3.1)."""
    t, s = list(teacher.parameters()), list(student.parameters())  # FSDP2: DTensors, updated shard by shard
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


# ---------------------------------------------------------------------------------------------------------------
# Optimiser: parameter groups and schedules precomputed per iteration (App. B, official CosineScheduler)
# ---------------------------------------------------------------------------------------------------------------
def param_groups(model, cfg):
    """AdamW groups by (lr multiplier, wd multiplier, is last layer), as the official get_params_groups:
    layer-wise lr decay: decay ** (depth + 1 - layer), layer 0 = patch embed / positions / tokens, block i = i + 1,
    heads and the final norm = depth + 1 (multiplier 1); patch embedding lr x 0.2; no weight decay on biases,
    norms and LayerScale gammas; the heads' last layers flagged so they can be frozen during the first epoch."""
    depth, groups = model.backbone.n_blocks, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = depth + 1
        if name.startswith("backbone."):
            if any(k in name for k in (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".register_tokens")):
                layer = 0
            elif ".blocks." in name:
                layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
        lr_mult = cfg.layerwise_decay ** (depth + 1 - layer)
        lr_mult *= cfg.patch_embed_lr_mult if ".patch_embed" in name else 1.0
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name)
        groups.setdefault(key, dict(params=[], lr_mult=lr_mult, wd_mult=wd_mult, is_last_layer=key[2]))
        groups[key]["params"].append(p)
    return list(groups.values())


def cosine_schedule(base, final, total, warmup=0, start_warmup=0.0):
    """Official CosineScheduler as an array: linear warmup start_warmup -> base over `warmup` iterations, then
    half a cosine from base to final over the remaining iterations."""
    warmup = min(warmup, total)  # a short test run may end inside the warmup
    steps = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([np.linspace(start_warmup, base, warmup), cosine])


def build_schedules(cfg, lr):
    """Every per-iteration value of the run, computed once (App. B) -> dict of float64 arrays [total_iters]."""
    T = cfg.total_iters
    s = dict(lr=cosine_schedule(lr, cfg.min_lr, T, cfg.warmup_iters),
             wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, T),
             momentum=cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, T),
             teacher_temp=np.full(T, cfg.teacher_temp))
    n = min(cfg.teacher_temp_warmup_iters, T)
    s["teacher_temp"][:n] = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, n)
    s["last_layer_lr"] = s["lr"].copy()
    s["last_layer_lr"][:cfg.freeze_last_layer_iters] = 0.0  # heads' prototypes frozen for the first epoch
    return s


def set_hyperparameters(optimizer, lr, last_layer_lr, wd):
    for g in optimizer.param_groups:
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up: torchrun (RANK in the environment) or one plain process; DDP or FSDP2
# ---------------------------------------------------------------------------------------------------------------
def setup_distributed():
    """-> (rank, world_size, device). A process group only when launched by torchrun (or anything setting RANK)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def get_rank():
    return dist.get_rank() if is_dist() else 0


def print0(*args, **kwargs):
    """print on rank 0 only (the built-in print stays untouched on every rank)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def fully_shard_fn():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap_student(student, teacher, cfg, device):
    """Activation checkpointing, then DDP (default) or FSDP2 (cfg.fsdp; the teacher is sharded the same way so the
    EMA runs shard by shard), then torch.compile. Returns the module to call; `student` stays the raw module
    (state dicts without "module." / "_orig_mod." prefixes)."""
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint  # keeps parameter names, unlike checkpoint_wrapper
        for block in student.backbone.blocks:
            checkpoint(block)
    model = student
    if is_dist() and cfg.fsdp:
        fully_shard = fully_shard_fn()
        for m in (student, teacher):
            for block in m.backbone.blocks:
                fully_shard(block)
            for sub in (m.backbone, m.dino_head, m.ibot_head, m):
                fully_shard(sub)
    elif is_dist():
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Training step, split in small functions (the official forward_backward is one 200-line method)
# ---------------------------------------------------------------------------------------------------------------
def derived_values(cfg, world_size):
    """Values computed from the config (printed, never written back into it)."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    accum = cfg.batch_size // (micro * world_size)
    assert micro * world_size * accum == cfg.batch_size, (
        f"batch_size {cfg.batch_size} must be micro_batch_size {micro} x world size {world_size} x an integer")
    lr = cfg.base_lr * math.sqrt(cfg.batch_size / 1024)  # square-root scaling rule (official "sqrt_wrt_1024")
    return dict(world_size=world_size, micro_batch_size=micro, accumulation_steps=accum, lr=lr)


def autocast_for(cfg, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def teacher_targets(teacher, batch, teacher_temp, centers, cfg, autocast):
    """Teacher probabilities for the DINO loss [2,B,K] and the iBOT loss [M,K], plus the fp32 logits (for the
    center update). Softmax and Sinkhorn-Knopp in fp32: logits / 0.04 overflow half precision."""
    with autocast:
        dino_logits, ibot_logits = teacher.teacher_logits(batch["global_crops"], batch["masks"])
    if cfg.fsdp:  # FSDP2 keeps the root's parameters gathered after a forward that has no backward: free them
        for m in teacher.modules():
            if hasattr(m, "reshard"):
                m.reshard()
    dino_logits, ibot_logits = dino_logits.float(), ibot_logits.float()  # [2B,K], [M,K]
    if cfg.centering == "sinkhorn_knopp":
        dino_probs, ibot_probs = sinkhorn_knopp(dino_logits, teacher_temp), sinkhorn_knopp(ibot_logits, teacher_temp)
    else:
        dino_probs = softmax_center(dino_logits, centers["dino"], teacher_temp)
        ibot_probs = softmax_center(ibot_logits, centers["ibot"], teacher_temp)
    return dino_probs.view(2, -1, dino_probs.shape[-1]), ibot_probs, dict(dino=dino_logits, ibot=ibot_logits)


def student_loss(model, batch, dino_probs, ibot_probs, cfg, autocast):
    """Total loss = DINO + iBOT + 0.1 KoLeo (Sec. 4), losses in fp32 -> (total, dict of the three terms)."""
    with autocast:
        cls, dino_logits, ibot_logits = model(batch["global_crops"], batch["local_crops"], batch["masks"])
    n_global = batch["global_crops"].shape[0]  # 2B
    B, K = n_global // 2, dino_logits.shape[-1]
    dino = dino_loss(dino_logits.float().view(-1, B, K), dino_probs, cfg.student_temp)  # [(2+n)B,K] -> [2+n,B,K]
    ibot = ibot_loss(ibot_logits.float(), ibot_probs, batch["mask_weights"], n_global, cfg.student_temp)
    koleo = sum(koleo_loss(c) for c in cls.float().chunk(2))  # per global crop, never across views of one image
    total = cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot + cfg.koleo_loss_weight * koleo
    return total, dict(dino=dino.detach(), ibot=ibot.detach(), koleo=koleo.detach())


def backward_micro_batch(model, batch, dino_probs, ibot_probs, scaler, cfg, autocast, n_micro, last):
    """Student loss on one micro-batch, backward scaled by 1/n_micro (gradient accumulation); DDP all-reduces the
    gradients only on the last micro-batch. -> dict of the detached loss terms."""
    sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
    with sync:
        total, parts = student_loss(model, batch, dino_probs, ibot_probs, cfg, autocast)
        scaler.scale(total / n_micro).backward()
    return dict(loss=total.detach(), **parts)


def forward_backward(model, teacher, batches, teacher_temp, centers, scaler, cfg, autocast):
    """Accumulate gradients over the micro-batches of one optimizer step (DDP syncs only on the last one).
    -> (mean loss terms, teacher logits of all micro-batches for the EMA center update; None with Sinkhorn-Knopp,
    which needs no state: [M,K] iBOT logits of many micro-batches are large)."""
    terms, logits = {}, {"dino": [], "ibot": []}
    for i, batch in enumerate(batches):
        dino_probs, ibot_probs, teacher_out = teacher_targets(teacher, batch, teacher_temp, centers, cfg, autocast)
        parts = backward_micro_batch(model, batch, dino_probs, ibot_probs, scaler, cfg, autocast, len(batches),
                                     last=i == len(batches) - 1)
        for k, v in parts.items():
            terms[k] = terms.get(k, 0.0) + v / len(batches)
        for k in logits:
            logits[k].append(teacher_out[k])
    return terms, {k: torch.cat(v) for k, v in logits.items()} if cfg.centering == "ema" else None


def optimizer_step(optimizer, scaler, student, it, cfg):
    """Freeze the prototypes during the first epoch, clip each module's gradient norm to 3.0 (official: backbone,
    DINO head and iBOT head separately), AdamW step. -> backbone gradient norm (before clipping)."""
    if it < cfg.freeze_last_layer_iters:
        for name, p in student.named_parameters():
            if "last_layer" in name:
                p.grad = None  # lr is 0 too (schedule); no grad also keeps Adam's moments untouched
    scaler.unscale_(optimizer)
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.clip_grad)
             for m in (student.backbone, student.dino_head, student.ibot_head)]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norms[0]


def batch_to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def step_seed(seed, it, rank):
    """Seed of the global torch RNG (drop path) at iteration `it`: a function of the step, so resuming is exact."""
    return int(np.random.SeedSequence([seed, it, rank, 1]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete (exact resume), loadable with weights_only=True; the teacher backbone alone
# ---------------------------------------------------------------------------------------------------------------
def full_state_dicts(student, teacher, optimizer, cfg):
    """Unsharded state dicts (FSDP2 gathers the shards; every rank must call this)."""
    if is_dist() and cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer is None:
            return get_model_state_dict(student, options=opts), get_model_state_dict(teacher, options=opts), None
        student_sd, optim_sd = get_state_dict(student, optimizer, options=opts)
        return student_sd, get_model_state_dict(teacher, options=opts), optim_sd
    return student.state_dict(), teacher.state_dict(), optimizer.state_dict() if optimizer else None


def rng_states():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = dict(torch=torch.get_rng_state(), python=random.getstate(),
                  numpy=[name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss])
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(path, cfg, model_args, step, student, teacher, optimizer, scaler, centers, accum):
    """Everything needed to continue exactly: weights, optimizer, step, centers, RNG states, data position (the
    data order and augmentations are functions of (seed, micro-step, rank), so the step pins them down).
    Written to a temporary file and renamed, so a crash mid-write never leaves a broken checkpoint."""
    student_sd, teacher_sd, optim_sd = full_state_dicts(student, teacher, optimizer, cfg)
    if get_rank() == 0:
        state = dict(config=asdict(cfg), model_args=model_args, step=step, student=student_sd, teacher=teacher_sd,
                     optimizer=optim_sd, scaler=scaler.state_dict(), centers=centers, rng=rng_states(),
                     data=dict(seed=cfg.seed, micro_step=step * accum))
        atomic_save(state, path)


def load_checkpoint(path, student, teacher, optimizer, scaler, cfg, device):
    """Restore a checkpoint written by save_checkpoint -> (step, centers)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if is_dist() and cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict
        opts = StateDictOptions(full_state_dict=True)
        set_state_dict(student, optimizer, model_state_dict=ckpt["student"], optim_state_dict=ckpt["optimizer"],
                       options=opts)
        set_model_state_dict(teacher, ckpt["teacher"], options=opts)
    else:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    return ckpt["step"], {k: v.to(device) for k, v in ckpt["centers"].items()}


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken file at `path`."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_backbone(path, state_dict, model_args):
    """The backbone alone (the "backbone.*" entries of a DinoV2 state dict) as a bare state dict in the official
    key layout, as the released hub weights, plus <stem>.json with the constructor kwargs (model.load_model)."""
    backbone = {k.removeprefix("backbone."): v.cpu() for k, v in state_dict.items() if k.startswith("backbone.")}
    atomic_save(backbone, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(model_args=model_args), f, indent=1)


# ---------------------------------------------------------------------------------------------------------------
# Logging and k-NN monitoring
# ---------------------------------------------------------------------------------------------------------------
def peak_memory_gb(device):
    """Peak memory since the last reset: CUDA allocator peak, or the process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2 ** 20


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 to clear_refs resets the peak RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def knn_eval(backbone, splits, image_size, device, autocast, train_size=None):
    """Weighted k-NN top-1 (k=20, T=0.07, DINO v1 protocol) of `backbone` on splits = (train, held-out).
    train_size: use a fixed random subset of the training images (None: all)."""
    train_set, test_set = splits
    if train_size and train_size < len(train_set):
        keep = np.random.default_rng(0).choice(len(train_set), train_size, replace=False)
        train_set = torch.utils.data.Subset(train_set, keep)
    with autocast:
        train_feats, train_labels = extract_features(backbone, train_set, image_size, device=device)
        test_feats, test_labels = extract_features(backbone, test_set, image_size, device=device)
    return knn_classify(train_feats, train_labels, test_feats, test_labels, ks=(20,), temperature=0.07)[20]["top1"]


# ---------------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------------
def make_loader(dataset, cfg, micro_batch, global_crop_size, start_micro_step, rank, world_size, device):
    """Infinite iterator of micro-batches starting at `start_micro_step`, augmented in the workers."""
    collate = MultiCropCollate(global_crop_size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size,
                               cfg.global_crop_scale, cfg.local_crop_scale, cfg.mask_ratio, cfg.mask_probability,
                               cfg.blur_sigma)
    sampler = StepBatchSampler(len(dataset), micro_batch, cfg.seed, rank, world_size, start_micro_step)
    return iter(DataLoader(SeededItems(dataset), batch_sampler=sampler, collate_fn=collate,
                           num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                           prefetch_factor=4 if cfg.num_workers else None))


def crop_size_at(cfg, it):
    """Global crop size at iteration `it`: larger during the final high-resolution phase (Sec. 4)."""
    return cfg.highres_global_crop_size if it >= cfg.total_iters - cfg.highres_iters else cfg.global_crop_size


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster preemption) -> finish the step, write a checkpoint, exit."""

    def __init__(self):
        self.received = False
        self.previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def handler(self, signum, frame):
        self.received = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def any_rank(self, device):
        flag = torch.tensor(float(self.received), device=device)
        if is_dist():  # all ranks must stop at the same step
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def start_run(cfg):
    """This process's rank, world size and device, and the derived values, printed with the resolved config."""
    rank, world_size = get_rank(), dist.get_world_size() if is_dist() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    d = derived_values(cfg, world_size)
    print0(f"config: {json.dumps(asdict(cfg))}\nderived: {json.dumps(d)}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    return rank, world_size, device, d


def train(cfg, dataset=None):
    """Pretrain with DINOv2; returns the raw (student, teacher) modules. `dataset` overrides cfg.data (tests)."""
    rank, world_size, device, d = start_run(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    splits = labelled_splits(cfg.data) if cfg.eval_every and dataset is None else None  # periodic k-NN
    dataset = dataset if dataset is not None else build_dataset(cfg.data, train=True)
    student, teacher, model_args = build_student_teacher(cfg)
    student, teacher = student.to(device), teacher.to(device)
    optimizer = torch.optim.AdamW(param_groups(student, cfg), lr=0.0, betas=cfg.adamw_betas)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    K = cfg.n_prototypes
    centers = dict(dino=torch.zeros(1, K, device=device), ibot=torch.zeros(1, K, device=device))  # EMA centering
    model = wrap_student(student, teacher, cfg, device)
    ckpt_path, start = os.path.join(cfg.output_dir, "checkpoint.pth"), 0
    if cfg.resume and os.path.exists(ckpt_path):
        start, centers = load_checkpoint(ckpt_path, student, teacher, optimizer, scaler, cfg, device)
        print0(f"resumed from {ckpt_path} at iteration {start}")
    schedules = build_schedules(cfg, d["lr"])
    stop_at, accum, autocast = cfg.stop_after or cfg.total_iters, d["accumulation_steps"], autocast_for(cfg, device)
    stop_signal, loader, loader_size = StopSignal(), None, None
    metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=stop_at, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    t_last, logged, it = time.perf_counter(), start, start
    for it in range(start, stop_at):
        if crop_size_at(cfg, it) != loader_size:  # start, or entering the high-resolution phase
            loader_size = crop_size_at(cfg, it)
            loader = make_loader(dataset, cfg, d["micro_batch_size"], loader_size, it * accum, rank, world_size, device)
        torch.manual_seed(step_seed(cfg.seed, it, rank))  # drop path draws: a function of the step
        s = {k: float(v[it]) for k, v in schedules.items()}
        set_hyperparameters(optimizer, s["lr"], s["last_layer_lr"], s["wd"])
        batches = [batch_to(next(loader), device) for _ in range(accum)]
        terms, teacher_out = forward_backward(model, teacher, batches, s["teacher_temp"], centers, scaler, cfg,
                                              autocast)
        grad_norm = optimizer_step(optimizer, scaler, student, it, cfg)
        # State that changes once per optimizer step, visibly: teacher EMA and (EMA centering) the centers.
        ema_update(teacher, student, s["momentum"])
        if cfg.centering == "ema":
            centers = {k: update_center(centers[k], teacher_out[k], cfg.center_momentum) for k in centers}
        bar.update(1)
        if (it + 1) % cfg.log_every == 0 or it + 1 == stop_at:
            row = dict(step=it + 1, **{k: float(v) for k, v in terms.items()}, grad_norm=float(grad_norm),
                       **{k: s[k] for k in ("lr", "wd", "momentum", "teacher_temp")},
                       images_per_s=(it + 1 - logged) * cfg.batch_size / (time.perf_counter() - t_last),
                       memory_gb=peak_memory_gb(device))
            t_last, logged = time.perf_counter(), it + 1
            bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}")
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
        if splits and (it + 1) % cfg.eval_every == 0:  # every rank computes it (FSDP needs all ranks)
            acc = knn_eval(teacher.backbone, splits, cfg.global_crop_size, device, autocast, cfg.knn_train_size)
            print0(f"\niteration {it + 1}: teacher k-NN top-1 {acc:.2f}% ({cfg.knn_train_size} train images)")
            if metrics_file:
                metrics_file.write(json.dumps(dict(step=it + 1, knn_top1=acc)) + "\n")
            t_last = time.perf_counter()
        stopping = stop_signal.any_rank(device)
        if stopping or (it + 1) % cfg.checkpoint_every == 0 or it + 1 == stop_at:
            save_checkpoint(ckpt_path, cfg, model_args, it + 1, student, teacher, optimizer, scaler, centers, accum)
        if stopping:
            print0(f"\nstop signal: checkpoint written at iteration {it + 1}; continue with --resume")
            break
    bar.close()
    stop_signal.restore()
    if metrics_file:
        metrics_file.close()
    if it + 1 == cfg.total_iters:
        teacher_sd = full_state_dicts(student, teacher, None, cfg)[1]
        if rank == 0:
            save_backbone(os.path.join(cfg.output_dir, "teacher_backbone.pth"), teacher_sd, model_args)
    return student, teacher


# ---------------------------------------------------------------------------------------------------------------
# Benchmark, baselines and main
# ---------------------------------------------------------------------------------------------------------------
def bench(device, steps=5):
    """Images/s and peak memory of one training step (teacher + student forward/backward, AdamW, EMA) on random
    images: the tiny preset (its batch, 28-px images) and ViT-S/14 (batch 8, paper crops 2 x 224 + 8 x 98),
    fp32 and bf16. Medians of `steps` steps after a warm-up; CPU seconds are printed too, as they vary less than
    wall time on a shared machine. Augmentation is timed separately (it runs in DataLoader workers)."""
    runs = (("tiny", "tiny", PRESETS["tiny"]["batch_size"], 28), ("ViT-S/14", "vit_s", 8, 224))
    for name, preset, batch, size in runs:
        for precision in ("fp32", "bf16"):
            cfg = Config(**{**PRESETS[preset], "batch_size": batch, "precision": precision, "total_iters": 100,
                            "warmup_iters": 10, "freeze_last_layer_iters": 0})
            torch.manual_seed(0)
            student, teacher, _ = build_student_teacher(cfg)
            student, teacher = student.to(device), teacher.to(device)
            optimizer = torch.optim.AdamW(param_groups(student, cfg), lr=1e-4)
            scaler, autocast = torch.amp.GradScaler(device.type, enabled=False), autocast_for(cfg, device)
            collate = MultiCropCollate(size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size)
            images = [(torch.rand(3, size, size), 0, i) for i in range(batch)]
            t0 = time.perf_counter()
            batches = [batch_to(collate(images), device)]
            t_collate = time.perf_counter() - t0
            wall, cpu = [], []
            for i in range(steps + 1):  # the first step warms up (allocations, kernel choices)
                if i == 1:
                    reset_peak_memory(device)
                t0, c0 = time.perf_counter(), time.process_time()
                forward_backward(student, teacher, batches, 0.07, None, scaler, cfg, autocast)
                optimizer_step(optimizer, scaler, student, i, cfg)
                ema_update(teacher, student, 0.994)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            t, c = float(np.median(wall[1:])), float(np.median(cpu[1:]))
            print(f"{name:9s} batch {batch:4d} {precision}: {batch / t:7.1f} images/s ({t:.3f} s/step wall, {c:.3f} "
                  f"s CPU), augmentation {batch / t_collate:7.1f} images/s, peak memory "
                  f"{peak_memory_gb(device):.2f} GB", flush=True)
            del student, teacher, optimizer, batches


def knn_baselines(cfg, device):
    """k-NN of raw pixels and of the randomly initialised teacher (same seed, same architecture)."""
    train_set, test_set = build_dataset(cfg.data, True), build_dataset(cfg.data, False)
    if isinstance(train_set, FashionMNIST):
        raw = lambda ds: (F.normalize(torch.from_numpy(ds.images).float().flatten(1), dim=-1),
                          torch.from_numpy(ds.labels))
        print(f"raw pixels: k-NN top-1 {knn_classify(*raw(train_set), *raw(test_set))[20]['top1']:.2f}%")
    torch.manual_seed(cfg.seed)
    _, teacher, _ = build_student_teacher(cfg)
    acc = knn_eval(teacher.backbone.to(device), (train_set, test_set), cfg.global_crop_size, device,
                   autocast_for(cfg, device))
    print(f"random init teacher: k-NN top-1 {acc:.2f}%")


def main():
    cfg, args = parse_config()
    _, _, device = setup_distributed()
    if args.bench:
        bench(device)
    elif args.baselines:
        knn_baselines(cfg, device)
    else:
        t0 = time.perf_counter()
        student, teacher = train(cfg)
        splits = labelled_splits(cfg.data)
        if splits:
            acc = knn_eval(teacher.backbone, splits, cfg.global_crop_size, device, autocast_for(cfg, device))
            print0(f"teacher k-NN (k=20, T=0.07) top-1 on the held-out split: {acc:.2f}% "
                   f"({(time.perf_counter() - t0) / 60:.1f} min in total)")
    if is_dist():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
