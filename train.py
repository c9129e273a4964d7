"""DINOv2 self-supervised pretraining (arXiv 2304.07193, Sec. 4-5, App. B) in one file, read top to bottom.

Student and teacher ViTs (model.py) see multi-crop views of unlabelled images; the student learns to predict the
teacher's prototype assignments of other views (DINO, image level) and of masked patches (iBOT, patch level), with
KoLeo spreading the features; the teacher is an EMA of the student (losses.py has the objectives).

Run (the same file from a laptop to a cluster):
    python train.py                                   # CPU demo: the named preset "tiny" on Fashion-MNIST, then
                                                      # the teacher's k-NN accuracy (README: result and time)
    python train.py --preset vit_s --data /path/imagenet --micro_batch_size 128       # one GPU
    torchrun --nproc_per_node=8 train.py --preset vit_l --data /path/imagenet          # one node
    torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --preset vit_g --fsdp --activation_checkpointing --data /path/images  # several nodes
    python train.py ... --resume                      # continue exactly from output_dir/checkpoint.pth
    python train.py --plan --preset vit_l             # per-GPU memory and FLOPs of a step (WORLD_SIZE), no GPU
    python train.py --bench                           # measured images/s and memory of a step, beside the plan
    python train.py --baselines                       # k-NN of raw pixels and of the network at initialisation
The dataclass defaults are the paper's (ViT-g/14, App. B); without --preset the preset "tiny" applies (PRESETS),
any --<field> VALUE overrides (cli.py), and the run prints the preset and its overrides, then the resolved config
(also stored in checkpoints). A new run never starts over an existing checkpoint (--resume or --overwrite), and
--resume refuses a config that would continue a different run (runtime.open_run_dir).

Paper -> code
  Sec. 4 image-level objective (DINO) ............... teacher_targets, student_loss (losses.dino_loss)
  Sec. 4 patch-level objective (iBOT), masking ...... data.mask_plan, DinoV2.forward (losses.ibot_loss)
  Sec. 4 untied DINO / iBOT heads ................... DinoV2, build_student_teacher
  Sec. 4 Sinkhorn-Knopp centering (or EMA centering)  teacher_targets; train_step updates the center once per step
  Sec. 4 KoLeo regularizer (weight 0.1) ............. student_loss (losses.koleo_loss, neighbours over all ranks)
  Sec. 4 adapting the resolution (518 px at the end)  crop_size_at, Config.highres_*
  Sec. 4 one optimizer step, written once ........... train_step (train, distill.py, plan.py and the tests)
  Sec. 5 FSDP, mixed precision, activation ckpt ..... wrap_student, autocast_for; memory plan: plan.py
  App. B multi-crop augmentation .................... data.MultiCropCollate (torch, no torchvision), Batches
  App. B AdamW, lr/wd/momentum/temperature schedules  build_schedules, param_groups, set_hyperparameters
  App. B / Tab. 16 hyperparameters and model sizes .. Config, PRESETS, model.ARCHS
  DINO v1 weighted k-NN evaluation .................. knn_eval (data.extract_features, data.knn_classify)

Datasets, augmentation, masks and the k-NN scorer live in data.py; processes, the run directory, checkpoint files,
progress and preemption in runtime.py. The data stream is a function of (seed, step, sample), so 1 GPU with
accumulation, 2 GPUs and 8 GPUs train on the same crops, and --resume may change the number of GPUs.
Checkpoint (output_dir/checkpoint.pth, torch.load(weights_only=True) works): {"config", "model_args", "step",
"student"/"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}, "optimizer", "scaler", "centers", "rng", "data"};
at the end also teacher_backbone.pth (bare backbone, official keys) + teacher_backbone.json ({"model_args": ...}).

Shape legend: B batch, N tokens, D width, H heads, K prototypes, M masked patches, C classes.
"""
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import cli
from cli import at_least, has_length, in_range, increasing, one_of
from data import (FashionMNIST, GlobalBatchSampler, MultiCropCollate, SeededItems, build_dataset, extract_features,
                  knn_classify, labelled_splits, subset)
from losses import dino_loss, ibot_loss, is_dist, koleo_loss, sinkhorn_knopp, softmax_center, update_center
from model import ARCHS, DINOHead, DinoVisionTransformer
from runtime import (Progress, RunError, StopSignal, atomic_save, full_state_dicts, get_rank, learner_state,
                     load_learner_state, open_run_dir, print0, release_lock, rng_states, save_backbone,
                     set_rng_states, setup_distributed)

# ---------------------------------------------------------------------------------------------------------------
# Configuration: defaults are the paper's ViT-g/14 run (App. B, Tab. 16); named presets override a few fields
# ---------------------------------------------------------------------------------------------------------------
CENTERINGS = ("sinkhorn_knopp", "ema")  # Sec. 4 (paper) | DINO's EMA centering (official default config)
PRECISIONS = ("bf16", "fp16", "fp32")
ATTN_IMPLS = ("auto", "fused", "explicit")  # model.resolve_attn_impl
FFN_LAYERS = ("", "mlp", "swiglu", "swiglufused")  # "" = the ARCHS entry's


# One "epoch" in the official code is 1250 iterations whatever the dataset size; the paper's schedules are
# 625k iterations with a 100k warmup (= 500 and 80 such epochs). Here everything is counted in iterations.
@dataclass
class Config:
    # --- data and run
    data: str = "fashion-mnist"  # "fashion-mnist", a folder of its IDX files, or of images (paper: LVD-142M, Sec. 3)
    output_dir: str = "runs/dinov2"  # checkpoint.pth, metrics.jsonl, teacher_backbone.pth/.json
    seed: int = 0  # model init, data order, augmentations, drop path
    # --- model (Sec. 4, App. B)
    arch: str = "vit_giant2"  # key of model.ARCHS: vit_small | vit_base | vit_large | vit_giant2 | vit_tiny (CPU)
    ffn_layer: str = ""  # mlp | swiglufused; "" = the ARCHS entry's (SwiGLU for vit_giant2, MLP otherwise)
    patch_size: int = 14  # pixels per patch side (ViT-*/14)
    num_register_tokens: int = 0  # the paper's models have none; registers (Darcet et al. 2023) came later
    layerscale: float = 1e-5  # LayerScale init value (App. B); 0 = no LayerScale
    drop_path_rate: float = 0.4  # stochastic depth, student only (App. B, Tab. 16: 0.4 for L/g from scratch)
    drop_path_uniform: bool = True  # same rate in every block (official config)
    attn_impl: str = "auto"  # model.py attention path: auto | fused | explicit
    # --- heads (Sec. 4: untied DINO and iBOT heads; sizes of the official vitg14 config)
    n_prototypes: int = 131072  # K, prototypes of each head (official vitg14/vitl14 configs; default config 65536)
    head_hidden_dim: int = 2048  # MLP width of the heads
    head_bottleneck_dim: int = 384  # DINO head's l2-normalised bottleneck (vitg14/vitl14 configs; default 256)
    ibot_head_bottleneck_dim: int = 256  # iBOT head's (the official configs override only the DINO head's)
    head_nlayers: int = 3  # Linear-GELU-Linear-GELU-Linear
    ibot_separate_head: bool = True  # Sec. 4: untied heads; false = the iBOT loss uses the DINO head (ablation)
    # --- multi-crop and masking (Sec. 4, App. B)
    global_crop_size: int = 224  # px, 2 global crops
    local_crop_size: int = 98  # px (98 = 7 x 14)
    n_local_crops: int = 8  # local crops per image (App. B)
    global_crop_scale: tuple = (0.32, 1.0)  # RandomResizedCrop area fraction
    local_crop_scale: tuple = (0.05, 0.32)  # RandomResizedCrop area fraction of the local crops
    blur_sigma: tuple = (0.1, 2.0)  # px, Gaussian blur sigma range (kernel 9)
    mask_ratio: tuple = (0.1, 0.5)  # iBOT masked fraction of patches, spread uniformly across the batch
    mask_probability: float = 0.5  # fraction of global crops that are masked
    # --- losses and teacher targets (Sec. 4)
    dino_loss_weight: float = 1.0  # weight of the image-level (DINO) loss
    ibot_loss_weight: float = 1.0  # weight of the patch-level (iBOT) loss
    koleo_loss_weight: float = 0.1  # per global crop
    student_temp: float = 0.1  # softmax temperature of the student
    teacher_temp: float = 0.07  # after warmup
    warmup_teacher_temp: float = 0.04  # teacher temperature at iteration 0, linear to teacher_temp
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
    weight_decay_end: float = 0.2  # weight decay at the end of the cosine
    momentum_teacher: float = 0.994  # EMA momentum, cosine to 1 (App. B; the official default config uses 0.992)
    momentum_teacher_end: float = 1.0  # teacher EMA momentum at the end of the cosine
    layerwise_decay: float = 0.9  # layer-wise lr decay (official default config; its vitg14 config uses 1.0)
    patch_embed_lr_mult: float = 0.2  # smaller lr for the patch embedding (official config)
    freeze_last_layer_iters: int = 1250  # prototypes frozen for the first (official) epoch
    clip_grad: float = 3.0  # gradient norm clip, applied to backbone and each head separately (official)
    adamw_betas: tuple = (0.9, 0.999)  # AdamW (beta1, beta2), official config
    # --- adapting the resolution (Sec. 4): the last iterations at a larger global crop, pos-embed interpolated
    highres_iters: int = 10000  # last iterations at the high resolution (Sec. 4: a short period at 518 px)
    highres_global_crop_size: int = 518  # px, global crop size in that phase (37 x 14)
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
    resume: bool = False  # continue from output_dir/checkpoint.pth (it must exist)
    overwrite: bool = False  # start afresh over an existing run in output_dir (its checkpoint is replaced)
    allow_changes: bool = False  # with --resume: accept a changed batch, schedule length, model or seed
    stop_after: int = 0  # stop (with a checkpoint) after this many iterations; 0 = run to total_iters

    def __post_init__(self):
        self.check()

    def check(self):
        """Every field's allowed values, one line each (cli.py turns a refusal into a one-line error)."""
        self.check_model()
        one_of("ffn_layer", self.ffn_layer, FFN_LAYERS)
        one_of("attn_impl", self.attn_impl, ATTN_IMPLS)
        one_of("centering", self.centering, CENTERINGS)
        one_of("precision", self.precision, PRECISIONS)
        for name in ("patch_size", "head_hidden_dim", "head_bottleneck_dim", "ibot_head_bottleneck_dim",
                     "head_nlayers", "batch_size", "total_iters", "log_every", "checkpoint_every"):
            at_least(name, getattr(self, name), 1)
        for name in ("num_register_tokens", "n_local_crops", "micro_batch_size", "teacher_temp_warmup_iters",
                     "freeze_last_layer_iters", "num_workers", "eval_every", "knn_train_size", "layerscale",
                     "dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight", "min_lr", "weight_decay",
                     "weight_decay_end", "patch_embed_lr_mult"):
            at_least(name, getattr(self, name), 0)
        for name in ("global_crop_size", "local_crop_size", "highres_global_crop_size"):
            at_least(name, getattr(self, name), self.patch_size)
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "base_lr", "clip_grad"):
            in_range(name, getattr(self, name), 1e-12, math.inf)  # strictly positive
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio", "adamw_betas", "blur_sigma"):
            has_length(name, getattr(self, name), 2)
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio"):
            in_range(name, getattr(self, name), 0.0, 1.0)
            increasing(name, getattr(self, name))
        increasing("blur_sigma", self.blur_sigma)
        at_least("blur_sigma", self.blur_sigma, 0.0)
        in_range("adamw_betas", self.adamw_betas, 0.0, 0.999999)
        for name in ("drop_path_rate", "mask_probability", "center_momentum", "momentum_teacher",
                     "momentum_teacher_end", "layerwise_decay"):
            in_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("warmup_iters", "highres_iters"):  # longer than the run: the run ends inside them
            at_least(name, getattr(self, name), 0)
        in_range("stop_after", self.stop_after, 0, self.total_iters)

    def check_model(self):
        """The architecture and the prototypes (distill.DistillConfig reads them from the teacher instead)."""
        one_of("arch", self.arch, list(ARCHS))
        at_least("n_prototypes", self.n_prototypes, 1)


PRESETS = {
    # App. B, Tab. 16. S/B/L are the paper's distillation rows (lr 1e-3 at batch 2048, no drop path, see
    # distill.py); used here to train from scratch. L/g from scratch: lr 3.5e-4 at batch 3072, drop path 0.4.
    "vit_s": dict(arch="vit_small", base_lr=1e-3 / math.sqrt(2), batch_size=2048, drop_path_rate=0.0,
                  n_prototypes=65536, head_bottleneck_dim=256),
    "vit_b": dict(arch="vit_base", base_lr=1e-3 / math.sqrt(2), batch_size=2048, drop_path_rate=0.0,
                  n_prototypes=65536, head_bottleneck_dim=256),
    # L/g: the official vitl14 / vitg14 configs (SwiGLU for L too, no layer-wise decay) and their images per
    # GPU (32 / 12); the global batch 3072 is reached by accumulation on fewer GPUs (python train.py --plan).
    "vit_l": dict(arch="vit_large", ffn_layer="swiglufused", layerwise_decay=1.0, micro_batch_size=32),
    "vit_g": dict(layerwise_decay=1.0, micro_batch_size=12),
    # CPU demo on Fashion-MNIST, 2 cores (result and time: README). Chosen by measurement (earlier sessions, bf16 on
    # a CPU with native bf16, the per-rank data stream of before December):
    # 7-px patches (16 tokens) train ~2.4x faster than 4-px ones and reached 72% vs 66% k-NN after 200 steps;
    # width 192 beat 128, depth 6 did not beat 4; batch 64 x 800 steps beat 128 x 400 (78.3% vs 76.3%); teacher
    # momentum 0.98 beat 0.994/0.99 in runs this short; no LayerScale: with 1e-5 a fresh tiny net's [CLS] token
    # ignores the image. Paper augmentations kept (milder crops/blur did not help). Differences under ~1% between
    # these single-seed runs are noise (2000 steps at base lr 4e-3 gave 79.4%, this preset 80.6%).
    # fp32: on CPUs without AVX512-BF16 / AMX, bf16 matmuls are emulated (measured on an AMD EPYC with AVX2:
    # a [1024,192] x [192,512] matmul 146 ms in bf16 vs 3.6 ms in fp32).
    "tiny": dict(data="fashion-mnist", output_dir="runs/tiny", arch="vit_tiny", patch_size=7, layerscale=0.0,
                 precision="fp32", drop_path_rate=0.0, n_prototypes=1024, head_hidden_dim=512,
                 head_bottleneck_dim=128, ibot_head_bottleneck_dim=128, global_crop_size=28, local_crop_size=14, n_local_crops=4, batch_size=64, total_iters=1800,
                 warmup_iters=180, base_lr=2e-3, momentum_teacher=0.98, teacher_temp_warmup_iters=540,
                 freeze_last_layer_iters=50, layerwise_decay=1.0, highres_iters=0, num_workers=1,
                 checkpoint_every=600, log_every=20),
}


MODES = [("bench", "measure images/s and peak memory of training steps (tiny, ViT-S/14 b=8), with the plan"),
         ("plan", "per-GPU peak memory and FLOPs of one step for this config and WORLD_SIZE; no GPU needed"),
         ("gpu_memory_gb", "with --plan: the GPU memory to fit, GB (default: this GPU's, or 80)",
          dict(type=float, default=0.0)),
         ("baselines", "k-NN of raw pixels and of the network at initialisation")]


def parse_config(argv=None):
    """Config from the command line (cli.py) -> (config, args) with args.bench / .plan / .baselines."""
    return cli.parse_config(Config, argv, presets=PRESETS, default_preset="tiny", extra_flags=MODES,
                            prog="train.py",
                            description="DINOv2 pretraining. Defaults: the paper's ViT-g/14 run; with no "
                                        "--preset the tiny CPU demo preset applies.")


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

    def forward(self, global_crops, local_crops, masks, mask_indices):
        """Student pass (through DDP/FSDP): one backbone pass per resolution; global crops masked (iBOT).
        -> class tokens of the global crops [2B,D], DINO logits [(2+n)B,K], iBOT logits [M,K]."""
        crops, crop_masks = [global_crops], [masks]
        if local_crops.shape[0]:
            crops, crop_masks = crops + [local_crops], crop_masks + [None]
        out = self.backbone(crops, masks=crop_masks, is_training=True)
        cls = torch.cat([o["x_norm_clstoken"] for o in out])  # [(2+n)B,D]
        patches = masked_tokens(out[0]["x_norm_patchtokens"], mask_indices)  # [2B,N,D] -> [M,D]
        return out[0]["x_norm_clstoken"], self.dino_head(cls), self.ibot_head(patches)

    @torch.no_grad()
    def teacher_logits(self, global_crops, mask_indices):
        """Teacher pass on the unmasked global crops -> DINO logits [2B,K], iBOT logits at the masked patches [M,K]."""
        out = self.backbone(global_crops, is_training=True)
        patches = masked_tokens(out["x_norm_patchtokens"], mask_indices)  # [M,D]
        return self.dino_head(out["x_norm_clstoken"]), self.ibot_head(patches)


def masked_tokens(patch_tokens, mask_indices):
    """The patch tokens the iBOT loss sees, gathered with indices the collate computed on the CPU (a known shape:
    no host sync, traceable): [2B,N,D] -> [M,D]; all of them when mask_indices is None (distillation, Sec. 5)."""
    tokens = patch_tokens.flatten(0, 1)  # [2B*N,D]
    return tokens if mask_indices is None else tokens.index_select(0, mask_indices)


def model_args_for(cfg, img_size=None):
    """DinoVisionTransformer kwargs of the teacher (no drop path), stored in checkpoints for load_model."""
    args = dict(img_size=img_size or cfg.global_crop_size, patch_size=cfg.patch_size, **ARCHS[cfg.arch],
                init_values=cfg.layerscale or None, num_register_tokens=cfg.num_register_tokens)
    if cfg.ffn_layer:
        args["ffn_layer"] = cfg.ffn_layer
    return args


def build_student_teacher(cfg):
    """Student and teacher DinoV2 with identical weights; the teacher has no drop path and no gradients."""
    args = model_args_for(cfg)
    D = args["embed_dim"]
    head = lambda bottleneck: DINOHead(D, cfg.n_prototypes, nlayers=cfg.head_nlayers,
                                       hidden_dim=cfg.head_hidden_dim, bottleneck_dim=bottleneck)
    def heads():  # (DINO, iBOT); tied (ablation of Sec. 4): one module, so the state dict repeats its keys
        dino = head(cfg.head_bottleneck_dim)
        return dino, head(cfg.ibot_head_bottleneck_dim) if cfg.ibot_separate_head else dino
    student = DinoV2(DinoVisionTransformer(**args, drop_path_rate=cfg.drop_path_rate,
                                           drop_path_uniform=cfg.drop_path_uniform, attn_impl=cfg.attn_impl),
                     *heads())
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
# Sec. 5: DDP or FSDP2, activation checkpointing, torch.compile (process set-up: runtime.setup_distributed)
# ---------------------------------------------------------------------------------------------------------------
def fully_shard_fn():
    try:  # torch >= 2.6
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap_student(student, teacher, cfg, device, distributed=True):
    """Activation checkpointing, then DDP (default) or FSDP2 (cfg.fsdp; the teacher is sharded the same way so the
    EMA runs shard by shard), then torch.compile. Returns the module to call; `student` stays the raw module
    (state dicts without "module." / "_orig_mod." prefixes)."""
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint  # keeps parameter names, unlike checkpoint_wrapper
        for block in student.backbone.blocks:
            checkpoint(block)
    model = student
    if distributed and is_dist() and cfg.fsdp:
        fully_shard = fully_shard_fn()
        for m in (student, teacher):
            for block in m.backbone.blocks:
                fully_shard(block)
            for sub in dict.fromkeys((m.backbone, m.dino_head, m.ibot_head, m)):  # tied heads: shard once
                fully_shard(sub)
    elif distributed and is_dist():
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


# ---------------------------------------------------------------------------------------------------------------
# One training step, written once: train(), distill.py, the plan and benchmark (plan.py) and the tests call it
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Learner:
    """A network that learns in train_step: the raw module (state dicts without prefixes), what is called
    (DDP / FSDP2 / compiled), its optimiser and scaler, and its EMA (train.py: the teacher; distill.py: the
    spare EMA of Sec. 5, the students' teacher being frozen)."""
    name: str
    model: DinoV2
    ema: DinoV2
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_learner(name, model, ema, cfg, device, distributed=True):
    """Move, wrap (FSDP2 replaces the parameters with sharded DTensors), then build AdamW over the parameters
    that will actually be updated: an optimizer built before fully_shard would update stale tensors.
    distributed=False: no DDP / FSDP2 even under torchrun (plan.py traces one process on fake tensors)."""
    if next(model.parameters()).device != device:  # (plan.py's fake parameters are already in place)
        model, ema = model.to(device), ema.to(device)
    wrapped = wrap_student(model, ema, cfg, device, distributed)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=0.0, betas=cfg.adamw_betas)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return Learner(name, model, ema, wrapped, optimizer, scaler)


def train_step(learners, teacher, batches, hp, centers, cfg, autocast):
    """One optimizer step of DINOv2 (Sec. 4) for every learner. For each micro-batch (gradient accumulation):
    the teacher's targets, then each learner's loss and backward (distillation students share one teacher
    pass). Then, once per step, visibly here: each learner's AdamW step and EMA, and (EMA centering) the centers.
    hp: this step's schedule values (lr, last_layer_lr, wd, momentum, teacher_temp).
    -> ({learner name: {loss terms (mean over micro-batches), grad_norm}}, new centers)."""
    terms = {learner.name: {} for learner in learners}
    teacher_logits = {"dino": [], "ibot": []}
    for i, batch in enumerate(batches):
        dino_targets, ibot_targets, logits = teacher_targets(teacher, batch, hp["teacher_temp"], centers, cfg,
                                                             autocast)  # [2,B,K], [M,K]
        for learner in learners:
            parts = backward_micro_batch(learner, batch, dino_targets, ibot_targets, cfg, autocast,
                                         n_micro=len(batches), last=i == len(batches) - 1)
            for k, v in parts.items():  # tensors: no host sync per micro-batch
                terms[learner.name][k] = terms[learner.name].get(k, 0.0) + v / len(batches)
        if cfg.centering == "ema":
            for k in teacher_logits:
                teacher_logits[k].append(logits[k])
    for learner in learners:
        set_hyperparameters(learner.optimizer, hp["lr"], hp["last_layer_lr"], hp["wd"])
        terms[learner.name]["grad_norm"] = optimizer_step(learner, cfg)
        ema_update(learner.ema, learner.model, hp["momentum"])  # train: the teacher; distill: the spare EMA
    if cfg.centering == "ema":  # the targets above used the old center; the new one serves the next step
        centers = {k: update_center(centers[k], torch.cat(teacher_logits[k]), cfg.center_momentum)
                   for k in centers}
    return terms, centers


def derived_values(cfg, world_size):
    """Values computed from the config (printed, never written back into it)."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    accum = cfg.batch_size // max(micro * world_size, 1)
    if micro < 1 or micro * world_size * accum != cfg.batch_size:
        raise ValueError(f"--batch_size: {cfg.batch_size} must be --micro_batch_size {micro} x world size "
                         f"{world_size} x a whole number of accumulation steps")
    lr = cfg.base_lr * math.sqrt(cfg.batch_size / 1024)  # square-root scaling rule (official "sqrt_wrt_1024")
    return dict(world_size=world_size, micro_batch_size=micro, accumulation_steps=accum, lr=lr)


def autocast_for(cfg, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def teacher_targets(teacher, batch, teacher_temp, centers, cfg, autocast):
    """Teacher probabilities for the DINO loss [2,B,K] and the iBOT loss [M,K], plus the fp32 logits (for the
    center update). Softmax and Sinkhorn-Knopp in fp32: logits / 0.04 overflow half precision."""
    with autocast:
        dino_logits, ibot_logits = teacher.teacher_logits(batch["global_crops"], batch["mask_indices"])
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


def student_loss(model, batch, dino_targets, ibot_targets, cfg, autocast):
    """Total loss = DINO + iBOT + 0.1 KoLeo (Sec. 4), losses in fp32 -> (total, dict of the three terms)."""
    with autocast:
        cls, dino_logits, ibot_logits = model(batch["global_crops"], batch["local_crops"], batch["masks"],
                                              batch["mask_indices"])
    n_global = batch["global_crops"].shape[0]  # 2B
    B, K = n_global // 2, dino_logits.shape[-1]
    dino = dino_loss(dino_logits.float().view(-1, B, K), dino_targets, cfg.student_temp)  # [2+n,B,K]
    ibot = ibot_loss(ibot_logits.float(), ibot_targets, batch["mask_weights"], n_global, cfg.student_temp)
    # KoLeo per global crop, never across views of one image; neighbours searched over every rank's images
    koleo = sum(koleo_loss(c, all_ranks=True) for c in cls.float().chunk(2))
    total = cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot + cfg.koleo_loss_weight * koleo
    return total, dict(dino=dino.detach(), ibot=ibot.detach(), koleo=koleo.detach())


def backward_micro_batch(learner, batch, dino_targets, ibot_targets, cfg, autocast, n_micro, last):
    """Student loss on one micro-batch, backward scaled by 1/n_micro (gradient accumulation); DDP all-reduces the
    gradients only on the last micro-batch. -> dict of the detached loss terms."""
    model = learner.wrapped
    sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()
    with sync:
        total, parts = student_loss(model, batch, dino_targets, ibot_targets, cfg, autocast)
        learner.scaler.scale(total / n_micro).backward()
    return dict(loss=total.detach(), **parts)


def optimizer_step(learner, cfg):
    """Clip each module's gradient norm to 3.0 (official: backbone, DINO head and iBOT head separately), AdamW
    step. The prototypes are frozen during the first epoch by a zero learning rate (build_schedules), as in
    the official code: their gradients still count in the clipping norm and warm up AdamW's moments.
    -> backbone gradient norm before clipping (a tensor: reading it would sync with the GPU)."""
    optimizer, scaler, student = learner.optimizer, learner.scaler, learner.model
    scaler.unscale_(optimizer)
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.clip_grad)
             for m in dict.fromkeys((student.backbone, student.dino_head, student.ibot_head))]
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
# Checkpoints: exact resume; the official training-checkpoint layout (primitives in runtime.py)
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(path, cfg, model_args, step, learner, centers):
    """Everything needed to continue exactly: weights, optimizer, step, centers, RNG states (the data order and
    augmentations are functions of (seed, step, sample), so the step pins them down on any number of GPUs).
    Official layout: "student" / "teacher" hold backbone.*, dino_head.*, ibot_head.*."""
    state = learner_state(learner, cfg)
    if get_rank() == 0:
        atomic_save(dict(config=asdict(cfg), model_args=model_args, step=step, student=state["student"],
                         teacher=state["ema"], optimizer=state["optimizer"], scaler=state["scaler"],
                         centers=centers, rng=rng_states(), data=dict(seed=cfg.seed, step=step)), path)


def load_checkpoint(ckpt, learner, cfg, device):
    """Restore a checkpoint written by save_checkpoint (loaded by open_run_dir) -> (step, centers)."""
    load_learner_state(learner, dict(ckpt, ema=ckpt["teacher"]), cfg)
    set_rng_states(ckpt["rng"])
    return ckpt["step"], {k: v.to(device) for k, v in ckpt["centers"].items()}


def knn_eval(backbone, splits, image_size, device, autocast, train_size=None):
    """Weighted k-NN top-1 (k=20, T=0.07, DINO v1 protocol) of `backbone` on splits = (train, held-out).
    train_size: use a fixed random subset of the training images (None: all)."""
    train_set, test_set = subset(splits[0], train_size), splits[1]
    with autocast:
        train_feats, train_labels = extract_features(backbone, train_set, image_size, device=device)
        test_feats, test_labels = extract_features(backbone, test_set, image_size, device=device)
    return knn_classify(train_feats, train_labels, test_feats, test_labels, ks=(20,), temperature=0.07)[20]["top1"]


# ---------------------------------------------------------------------------------------------------------------
# The training loop, shared by train() and distill.py
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Who this process is and what follows from the config (computed once, printed, never written back)."""
    rank: int
    world_size: int
    device: torch.device
    micro_batch_size: int
    accumulation_steps: int
    lr: float  # peak learning rate after the square-root scaling rule
    stop_at: int  # last iteration of this invocation (stop_after or total_iters)
    autocast: object


def start_run(cfg):
    """This process's rank, world size and device, and the derived values, printed with the resolved config."""
    rank, world_size = get_rank(), dist.get_world_size() if is_dist() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    d = derived_values(cfg, world_size)
    print0(f"config: {json.dumps(asdict(cfg))}\nderived: {json.dumps(d)}")
    return Run(rank, world_size, device, d["micro_batch_size"], d["accumulation_steps"], d["lr"],
               min(cfg.stop_after or cfg.total_iters, cfg.total_iters), autocast_for(cfg, device))


def crop_size_at(cfg, it):
    """Global crop size at iteration `it`: larger during the final high-resolution phase (Sec. 4). The position
    embedding keeps the grid of global_crop_size (16 x 16 at 224 px) and is interpolated bicubically to the
    larger grid on the fly; the official released weights instead carry a 37 x 37 grid learned at 518 px."""
    return cfg.highres_global_crop_size if it >= cfg.total_iters - cfg.highres_iters else cfg.global_crop_size


class Batches:
    """The data stream: the micro-batches of step `it` for this rank (a function of (seed, it, sample), see
    data.GlobalBatchSampler), augmented in DataLoader workers; the loader is rebuilt when the global crop size
    changes (start, resume, entering the high-resolution phase)."""

    def __init__(self, dataset, cfg, run, prepare=None):
        self.dataset, self.cfg, self.run, self.loader, self.size = dataset, cfg, run, None, None
        self.prepare = prepare or (lambda batch: batch)  # distill.py: no masks (Sec. 5)

    def at(self, it):
        cfg, run = self.cfg, self.run
        if crop_size_at(cfg, it) != self.size:
            self.size = crop_size_at(cfg, it)
            collate = MultiCropCollate(self.size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size,
                                       global_scale=cfg.global_crop_scale, local_scale=cfg.local_crop_scale,
                                       mask_ratio=cfg.mask_ratio, mask_probability=cfg.mask_probability,
                                       blur_sigma=cfg.blur_sigma, seed=cfg.seed, global_batch=cfg.batch_size)
            sampler = GlobalBatchSampler(len(self.dataset), cfg.batch_size, run.micro_batch_size, cfg.seed,
                                         run.rank, run.world_size, start_step=it)
            self.loader = iter(DataLoader(SeededItems(self.dataset), batch_sampler=sampler, collate_fn=collate,
                                          num_workers=cfg.num_workers, pin_memory=run.device.type == "cuda",
                                          prefetch_factor=4 if cfg.num_workers else None))
        return [self.prepare(batch_to(next(self.loader), run.device)) for _ in range(run.accumulation_steps)]


def train_loop(cfg, run, learners, teacher, centers, batches, start, save, log, monitor=None):
    """Iterations start .. run.stop_at of train_step, with logging, periodic evaluation (monitor(it)) and
    checkpoints (save(step, centers)); a stop signal writes a checkpoint and exits the process.
    -> the centers after the last step."""
    schedules, stop_signal = build_schedules(cfg, run.lr), StopSignal()
    try:
        for it in range(start, run.stop_at):
            micro_batches = batches.at(it)  # (before seeding: a new DataLoader draws from the global RNG)
            torch.manual_seed(step_seed(cfg.seed, it, run.rank))  # drop path draws: a function of the step
            hp = {k: float(v[it]) for k, v in schedules.items()}  # lr, last_layer_lr, wd, momentum, teacher_temp
            with log.counting_flops():  # the first step on a GPU: its FLOPs, for MFU
                terms, centers = train_step(learners, teacher, micro_batches, hp, centers, cfg, run.autocast)
            log.step(it, terms, hp)
            if monitor and cfg.eval_every and (it + 1) % cfg.eval_every == 0:
                monitor(it)
            stopping = stop_signal.any_rank(run.device)
            if stopping or (it + 1) % cfg.checkpoint_every == 0 or it + 1 == run.stop_at:
                save(it + 1, centers)
            if stopping:
                print0(f"\nstop signal: checkpoint written at iteration {it + 1}; continue with --resume")
                raise SystemExit(0)  # at once: a scheduler's grace period leaves no time for evaluation
    finally:
        stop_signal.restore()
        log.close()
        release_lock(os.path.join(cfg.output_dir, "run.lock"))
    return centers


def periodic_knn(cfg, run, backbone, log):
    """monitor(it) for train_loop: the k-NN of `backbone` on a subset of the labelled split, logged (every rank
    computes it: FSDP2 needs all ranks in the forward); None when the data has no labels."""
    splits = labelled_splits(cfg.data) if cfg.eval_every else None
    if not splits:
        return None

    def monitor(it):
        acc = knn_eval(backbone, splits, cfg.global_crop_size, run.device, run.autocast, cfg.knn_train_size)
        print0(f"\niteration {it + 1}: teacher k-NN top-1 {acc:.2f}% ({cfg.knn_train_size} train images)")
        log.write(dict(step=it + 1, knn_top1=acc))
    return monitor


def zero_centers(n_prototypes, device):
    return dict(dino=torch.zeros(1, n_prototypes, device=device), ibot=torch.zeros(1, n_prototypes, device=device))


def train(cfg, dataset=None):
    """Pretrain with DINOv2; returns the raw (student, teacher) modules. `dataset` overrides cfg.data (tests)."""
    run = start_run(cfg)
    ckpt_path, ckpt = os.path.join(cfg.output_dir, "checkpoint.pth"), open_run_dir(cfg, run)  # before any work
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    student, teacher, model_args = build_student_teacher(cfg)
    learner = build_learner("student", student, teacher, cfg, run.device)
    centers, start = zero_centers(cfg.n_prototypes, run.device), 0  # centers: EMA centering only
    if ckpt:
        start, centers = load_checkpoint(ckpt, learner, cfg, run.device)
        print0(f"resumed from {ckpt_path} at iteration {start}")
    log = Progress(cfg, run, start, "train")
    monitor = periodic_knn(cfg, run, teacher.backbone, log) if dataset is None else None
    dataset = dataset if dataset is not None else build_dataset(cfg.data, train=True)
    save = lambda step, c: save_checkpoint(ckpt_path, cfg, model_args, step, learner, c)
    train_loop(cfg, run, [learner], teacher, centers, Batches(dataset, cfg, run), start, save, log, monitor)
    if run.stop_at == cfg.total_iters:  # the released artefact: the teacher backbone, official keys
        teacher_sd = full_state_dicts(student, teacher, None, cfg)[1]
        if run.rank == 0:
            save_backbone(os.path.join(cfg.output_dir, "teacher_backbone.pth"), teacher_sd, model_args)
    return student, teacher


# ---------------------------------------------------------------------------------------------------------------
# Baselines and main (the plan and the benchmark live in plan.py)
# ---------------------------------------------------------------------------------------------------------------
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
    if args.plan or args.bench:
        import plan  # imports this file: loaded on demand
        return plan.main(cfg, args)
    print(cli.describe_overrides(cfg, args.preset, PRESETS, Config), flush=True)
    _, world_size, device = setup_distributed()
    try:
        derived_values(cfg, world_size)
        if args.baselines:
            return knn_baselines(cfg, device)
        t0 = time.perf_counter()
        student, teacher = train(cfg)
    except RunError as e:
        cli.error(str(e))
    except ValueError as e:
        if not str(e).startswith("--"):  # a bug, not a refused value: keep the traceback
            raise
        cli.error(str(e))
    splits = labelled_splits(cfg.data) if min(cfg.stop_after or cfg.total_iters, cfg.total_iters) == \
        cfg.total_iters else None  # a run stopped early (--stop_after) exits without the evaluation
    if splits:
        acc = knn_eval(teacher.backbone, splits, cfg.global_crop_size, device, autocast_for(cfg, device))
        print0(f"teacher k-NN (k=20, T=0.07) top-1 on the held-out split: {acc:.2f}% "
               f"({(time.perf_counter() - t0) / 60:.1f} min in total)")
    if is_dist():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
