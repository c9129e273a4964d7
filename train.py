"""DINOv2 self-supervised pretraining (arXiv 2304.07193, Sec. 4-5, App. B) in one file, read top to bottom.

Student and teacher ViTs (model.py) see multi-crop views of unlabelled images; the student learns to predict the
teacher's prototype assignments of other views (DINO, image level) and of masked patches (iBOT, patch level), with
KoLeo spreading the features; the teacher is an EMA of the student (losses.py has the objectives).

Run (the same file from a laptop to a cluster; README: results, times and each command's plan):
    python train.py                                   # CPU demo: the preset "tiny" on Fashion-MNIST, then k-NN
    python train.py --preset vit_s --data /path/imagenet --micro_batch_size 128       # one GPU
    torchrun --nproc_per_node=8 train.py --preset vit_l --data /path/imagenet          # one node
    torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --preset vit_g --fsdp --activation_checkpointing --data /path/images  # several nodes
    python train.py ... --resume                      # continue exactly from output_dir/checkpoint.pth
The dataclass defaults are the paper's (ViT-g/14, App. B); without --preset "tiny" applies (PRESETS); any
--<field> VALUE overrides (cli.py). The resolved config is printed and stored in checkpoints; a new run never
starts over an existing one and --resume refuses a different run (runtime.open_run_dir).

Paper -> code
  Sec. 4 image-level objective (DINO) ............... student_loss (losses.dino_loss)
  Sec. 4 patch-level objective (iBOT), masking ...... augment.mask_plan, DinoV2.forward, losses.ibot_loss_in_chunks
  Sec. 4 untied DINO / iBOT heads ................... DinoV2, build_student_teacher
  Sec. 4 Sinkhorn-Knopp centering (or EMA centering)  teacher_targets, over the step's global batch
  Sec. 4 KoLeo regularizer (weight 0.1) ............. student_loss (losses.koleo_loss, groups of koleo_group_size)
  Sec. 4 adapting the resolution (518 px at the end)  build_schedules (its own schedule), Config.highres_*
  Sec. 4 one optimizer step ......................... train_step: teacher_targets, backward_micro_batch,
                                                      optimizer_step, ema_update (distill.py composes the same)
  Sec. 5 FSDP, mixed precision, activation ckpt ..... runtime.wrap, runtime.autocast
  App. B multi-crop augmentation .................... augment.MultiCropCollate, data.Batches
  App. B AdamW, lr/wd/momentum/temperature schedules  build_schedules, param_groups, set_hyperparameters
  App. B / Tab. 16 hyperparameters and model sizes .. Config, PRESETS, model.ARCHS

The data stream is a function of (seed, step, sample) and the objective does not depend on how the global batch
is split into ranks and micro-batches: 1 GPU with accumulation, 2 GPUs and 8 GPUs train the same model, and
--resume may change the number of GPUs (the checkpoint's layout: save_checkpoint).

Shape legend: B batch, N tokens, D width, H heads, K prototypes, M masked patches, b head bottleneck width.
"""
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import cli
from cli import at_least, has_length, in_range, increasing, one_of
from data import Batches, build_dataset, knn_eval, labelled_splits
from losses import (PrototypeTargets, dino_loss, ibot_loss_in_chunks, koleo_loss, sinkhorn_knopp_bias,
                    update_center)
from model import ARCHS, ATTN_IMPLS, DINOHead, DinoVisionTransformer
from runtime import (DTYPES, Progress, StopSignal, atomic_save, autocast, full_state_dicts,
                     gathered, get_rank, load_state_dicts, open_run_dir, print0, refusals,
                     release_lock, resolve_precision, rng_states, save_backbone, set_rng_states,
                     setup_distributed, start_run, teardown_distributed, wrap)

# ---------------------------------------------------------------------------------------------------------------
# Configuration: defaults are the paper's ViT-g/14 run (App. B, Tab. 16); named presets override a few fields
# ---------------------------------------------------------------------------------------------------------------
CENTERINGS = ("sinkhorn_knopp", "ema")  # Sec. 4 (paper) | DINO's EMA centering (official default config)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # runtime.resolve_precision
FFN_LAYERS = ("", "mlp", "swiglu", "swiglufused")  # "" = the ARCHS entry's


# One "epoch" in the official code is 1250 iterations whatever the dataset size; the paper's schedules are
# 625k iterations with a 100k warmup (= 500 and 80 such epochs). Here everything is counted in iterations.
@dataclass
class Config:
    # --- data and run
    data: str = "fashion-mnist"  # "fashion-mnist", a folder of its IDX files, or of images (paper: LVD-142M)
    output_dir: str = "runs/dinov2"  # checkpoint.pth, metrics.jsonl, teacher_backbone.pth/.json
    seed: int = 0  # model init, data order, augmentations, drop path
    # --- model (Sec. 4, App. B)
    arch: str = "vit_giant2"  # key of model.ARCHS: vit_small | vit_base | vit_large | vit_giant2 | vit_tiny
    ffn_layer: str = ""  # mlp | swiglufused; "" = the ARCHS entry's (SwiGLU for vit_giant2, MLP otherwise)
    patch_size: int = 14  # pixels per patch side (ViT-*/14)
    num_register_tokens: int = 0  # registers (Darcet et al. 2023); the paper's models have none
    layerscale: float = 1e-5  # LayerScale init value (App. B); 0 = no LayerScale
    drop_path_rate: float = 0.4  # stochastic depth, student only (Tab. 16: 0.4 for L/g from scratch)
    drop_path_uniform: bool = True  # same rate in every block (official config)
    attn_impl: str = "auto"  # model.py attention path: auto | fused | explicit
    # --- heads (Sec. 4: untied DINO and iBOT heads; sizes of the official vitg14 config)
    n_prototypes: int = 131072  # K, prototypes of each head (official vitg14/vitl14 configs)
    head_hidden_dim: int = 2048  # MLP width of the heads
    head_bottleneck_dim: int = 384  # DINO head's l2-normalised bottleneck (official vitg14/vitl14 configs)
    ibot_head_bottleneck_dim: int = 256  # iBOT head's (the official configs override only the DINO head's)
    head_nlayers: int = 3  # Linear-GELU-Linear-GELU-Linear
    ibot_separate_head: bool = True  # Sec. 4: untied heads; false = the iBOT loss uses the DINO head
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
    koleo_group_size: int = 12  # KoLeo neighbours among this many consecutive images (official: per-GPU batch)
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
    base_lr: float = 2e-4  # lr for a batch of 1024, scaled by sqrt(batch / 1024): 3.5e-4 at 3072 (Tab. 16)
    min_lr: float = 1e-6  # end of the cosine decays (official config)
    weight_decay: float = 0.04  # cosine 0.04 -> 0.2 (App. B)
    weight_decay_end: float = 0.2  # weight decay at the end of the cosine
    momentum_teacher: float = 0.994  # teacher EMA momentum, cosine to 1 (App. B)
    momentum_teacher_end: float = 1.0  # teacher EMA momentum at the end of the cosine
    layerwise_decay: float = 0.9  # layer-wise lr decay (official default config; its vitg14 config: 1.0)
    patch_embed_lr_mult: float = 0.2  # smaller lr for the patch embedding (official config)
    freeze_last_layer_iters: int = 1250  # prototypes frozen for the first (official) epoch
    clip_grad: float = 3.0  # gradient norm clip, backbone and each head separately (official)
    adamw_betas: tuple = (0.9, 0.999)  # AdamW (beta1, beta2), official config
    # --- adapting the resolution (Sec. 4: "a short period at the end"), with its own schedule (DINOv3's)
    highres_iters: int = 10000  # last iterations, at the high resolution (paper: 518 px at the end)
    highres_global_crop_size: int = 518  # px, global crops in that phase (37 x 14)
    highres_base_lr: float = 5e-5  # peak lr of the phase for a batch of 1024 (DINOv3 high-res adaptation)
    highres_warmup_iters: int = 3333  # linear lr warmup at the start of the phase (DINOv3: a third of it)
    highres_momentum_teacher: float = 0.999  # constant teacher EMA momentum in the phase (DINOv3)
    highres_teacher_temp: float = 0.07  # constant teacher temperature in the phase (DINOv3)
    highres_weight_decay: float = 0.04  # constant weight decay in the phase (DINOv3)
    # --- systems
    precision: str = "auto"  # auto (bf16 where native, else fp32) | bf16 | fp16 (GradScaler) | fp32
    fsdp: bool = False  # FSDP2 fully_shard instead of DDP (models that do not fit, ViT-g)
    activation_checkpointing: bool = False  # recompute each block in the backward pass (memory for compute)
    compile: bool = False  # torch.compile the student
    num_workers: int = 8  # DataLoader workers per process, each runs the batched augmentation (0 = in-process)
    ibot_chunk_rows: int = 512  # patches whose [rows, K] prototype logits are computed at once
    # --- logging, evaluation, checkpoints
    log_every: int = 10  # iterations between metrics.jsonl lines / progress-bar updates
    eval_every: int = 0  # iterations between k-NN evaluations when the data has labels (0 = only at the end)
    knn_train_size: int = 10000  # training images used by the periodic k-NN (the final one uses all)
    checkpoint_every: int = 1000  # iterations between checkpoints (also on SIGTERM/SIGUSR1 and at the end)
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
                     "head_nlayers", "batch_size", "total_iters", "log_every", "checkpoint_every",
                     "ibot_chunk_rows"):
            at_least(name, getattr(self, name), 1)
        at_least("koleo_group_size", self.koleo_group_size, 2)  # a group of one has no neighbour
        for name in ("num_register_tokens", "n_local_crops", "micro_batch_size", "teacher_temp_warmup_iters",
                     "freeze_last_layer_iters", "num_workers", "eval_every", "knn_train_size", "layerscale",
                     "dino_loss_weight", "ibot_loss_weight", "koleo_loss_weight", "min_lr", "weight_decay",
                     "weight_decay_end", "patch_embed_lr_mult", "highres_base_lr", "highres_weight_decay",
                     "warmup_iters", "highres_iters", "highres_warmup_iters"):  # a warmup may outlast the run
            at_least(name, getattr(self, name), 0)
        for name in ("global_crop_size", "local_crop_size", "highres_global_crop_size"):
            at_least(name, getattr(self, name), self.patch_size)
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp", "highres_teacher_temp", "base_lr",
                     "clip_grad"):
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
                     "momentum_teacher_end", "highres_momentum_teacher", "layerwise_decay"):
            in_range(name, getattr(self, name), 0.0, 1.0)
        in_range("stop_after", self.stop_after, 0, self.total_iters)

    def check_model(self):
        """The architecture and the prototypes (distill.DistillConfig reads them from the teacher instead)."""
        one_of("arch", self.arch, list(ARCHS))
        at_least("n_prototypes", self.n_prototypes, 1)


# Fields that may differ on --resume (systems, bookkeeping); open_run_dir refuses others without --allow_changes.
RESUMABLE_CHANGES = {"data", "output_dir", "micro_batch_size", "fsdp", "activation_checkpointing", "compile",
                     "num_workers", "ibot_chunk_rows", "log_every", "eval_every", "knn_train_size",
                     "checkpoint_every", "resume", "overwrite", "allow_changes", "stop_after", "attn_impl"}

PRESETS = {
    # Tab. 16's distillation rows (lr 1e-3 at batch 2048, no drop path) trained from scratch; KoLeo groups of
    # the official default per-GPU batch.
    "vit_s": dict(arch="vit_small", base_lr=1e-3 / math.sqrt(2), batch_size=2048, drop_path_rate=0.0,
                  n_prototypes=65536, head_bottleneck_dim=256, koleo_group_size=64),
    "vit_b": dict(arch="vit_base", base_lr=1e-3 / math.sqrt(2), batch_size=2048, drop_path_rate=0.0,
                  n_prototypes=65536, head_bottleneck_dim=256, koleo_group_size=64),
    # The official vitl14 / vitg14 configs (SwiGLU for L too, no layer-wise decay) and images per GPU (32 / 12).
    "vit_l": dict(arch="vit_large", ffn_layer="swiglufused", layerwise_decay=1.0, micro_batch_size=32,
                  koleo_group_size=32),
    "vit_g": dict(layerwise_decay=1.0, micro_batch_size=12),
    # The CPU demo on Fashion-MNIST (README: result, time, and how it was chosen): 7-px patches of 28-px crops
    # (16 tokens), a 192-wide 4-deep ViT, 1,024 prototypes, no LayerScale (with 1e-5 a fresh tiny net's [CLS]
    # token ignores the image), teacher momentum 0.98 (short runs), KoLeo over the 64 images one process holds
    # (as the official per-GPU batch). Two global crops and no local ones: on 28-px images local crops cost a
    # third of the step and did not pay for it (docs/studies.md, "Toward a 6-minute demo").
    "tiny": dict(data="fashion-mnist", output_dir="runs/tiny", arch="vit_tiny", patch_size=7, layerscale=0.0,
                 drop_path_rate=0.0, n_prototypes=1024, head_hidden_dim=512, head_bottleneck_dim=128,
                 ibot_head_bottleneck_dim=128, global_crop_size=28, local_crop_size=14, n_local_crops=0,
                 batch_size=64, koleo_group_size=64, total_iters=1800, warmup_iters=180, base_lr=2e-3,
                 momentum_teacher=0.98, teacher_temp_warmup_iters=540, freeze_last_layer_iters=50,
                 layerwise_decay=1.0, highres_iters=0, num_workers=1, checkpoint_every=600, log_every=20),
}


def parse_config(argv=None):
    """Config from the command line (cli.py) -> (config, args)."""
    return cli.parse_config(Config, argv, presets=PRESETS, default_preset="tiny", prog="train.py",
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
        """Student pass (through DDP/FSDP2): one backbone pass per resolution; global crops masked (iBOT).
        -> class tokens of the global crops [2B,D], DINO logits [(2+n)B,K], and for the iBOT loss (computed in
        chunks of patches outside) the bottleneck features at the masked patches [M,b] and the prototypes [K,b]."""
        crops, crop_masks = [global_crops], [masks]
        if local_crops.shape[0]:
            crops, crop_masks = crops + [local_crops], crop_masks + [None]
        out = self.backbone(crops, masks=crop_masks, is_training=True)
        cls = torch.cat([o["x_norm_clstoken"] for o in out])  # [(2+n)B,D]
        patches = masked_tokens(out[0]["x_norm_patchtokens"], mask_indices)  # [2B,N,D] -> [M,D]
        ibot_z, prototypes = self.ibot_head.bottleneck(patches), self.ibot_head.last_layer.weight  # [M,b], [K,b]
        return out[0]["x_norm_clstoken"], self.dino_head(cls), ibot_z, prototypes

    @torch.no_grad()
    def teacher_features(self, global_crops, mask_indices):
        """Teacher pass on the unmasked global crops -> the heads' bottleneck features: DINO [2B,b], iBOT at the
        masked patches [M,b] (the prototype scores follow from the heads' last layers, in teacher_targets)."""
        out = self.backbone(global_crops, is_training=True)
        patches = masked_tokens(out["x_norm_patchtokens"], mask_indices)  # [M,D]
        return self.dino_head.bottleneck(out["x_norm_clstoken"]), self.ibot_head.bottleneck(patches)


def masked_tokens(patch_tokens, mask_indices):
    """The patch tokens the iBOT loss sees, gathered with indices the collate computed on the CPU (a known shape:
    no host sync, traceable): [2B,N,D] -> [M,D]; all of them when mask_indices is None (distillation, Sec. 5)."""
    tokens = patch_tokens.flatten(0, 1)  # [2B*N,D]
    return tokens if mask_indices is None else tokens.index_select(0, mask_indices)


def model_args_for(cfg, depth=None):
    """DinoVisionTransformer kwargs of the teacher (no drop path), stored in checkpoints for load_model.
    depth: fewer blocks than the architecture's (plan.py traces shallow copies)."""
    args = dict(img_size=cfg.global_crop_size, patch_size=cfg.patch_size, **ARCHS[cfg.arch],
                init_values=cfg.layerscale or None, num_register_tokens=cfg.num_register_tokens)
    overrides = dict(depth=depth, ffn_layer=cfg.ffn_layer)  # "" / None: the architecture's own
    return {**args, **{k: v for k, v in overrides.items() if v}}


def build_student_teacher(cfg, depth=None):
    """Student and teacher DinoV2 with identical weights; the teacher has no drop path and no gradients.
    -> (student, teacher, the teacher backbone's model_args)."""
    args = model_args_for(cfg, depth)
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
# Optimiser: parameter groups, schedules precomputed per iteration (App. B), the student and its AdamW
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
            if any(k in name for k in (".pos_embed", ".patch_embed", ".mask_token", ".cls_token",
                                       ".register_tokens")):
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


def build_schedules(cfg, lr, highres_lr):
    """Every per-iteration value of the run, computed once -> dict of float64 arrays [total_iters]: lr,
    last_layer_lr, wd, momentum, teacher_temp, global_crop_size. The main phase (App. B) has the paper's
    cosines; the high-resolution phase at the end (Sec. 4) has its own: an lr warmup to highres_lr and a
    cosine to min_lr, constant momentum, temperature and weight decay (DINOv3's high-resolution adaptation)."""
    H = min(cfg.highres_iters, cfg.total_iters)
    T = cfg.total_iters - H  # iterations of the main phase
    main = dict(lr=cosine_schedule(lr, cfg.min_lr, T, cfg.warmup_iters),
                wd=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, T),
                momentum=cosine_schedule(cfg.momentum_teacher, cfg.momentum_teacher_end, T),
                teacher_temp=np.full(T, cfg.teacher_temp), global_crop_size=np.full(T, cfg.global_crop_size))
    n = min(cfg.teacher_temp_warmup_iters, T)
    main["teacher_temp"][:n] = np.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, n)
    highres = dict(lr=cosine_schedule(highres_lr, cfg.min_lr, H, cfg.highres_warmup_iters),
                   wd=np.full(H, cfg.highres_weight_decay), momentum=np.full(H, cfg.highres_momentum_teacher),
                   teacher_temp=np.full(H, cfg.highres_teacher_temp),
                   global_crop_size=np.full(H, cfg.highres_global_crop_size))
    s = {k: np.concatenate([v, highres[k]]).astype(np.float64) for k, v in main.items()}
    s["last_layer_lr"] = s["lr"].copy()
    s["last_layer_lr"][:cfg.freeze_last_layer_iters] = 0.0  # heads' prototypes frozen for the first epoch
    return s


def set_hyperparameters(optimizer, lr, last_layer_lr, wd):
    for g in optimizer.param_groups:
        g["lr"] = (last_layer_lr if g["is_last_layer"] else lr) * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]


@dataclass
class Student:
    """What learns: the raw module (state dicts without prefixes), the module that is called (DDP / FSDP2 /
    compiled), and its AdamW and gradient scaler."""
    model: DinoV2
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_student(model, ema, cfg, device, distributed=True):
    """Move and wrap the student (and shard its EMA like it), then build AdamW over the parameters that will
    actually be updated (after fully_shard, which replaces them with sharded DTensors) -> Student."""
    if next(model.parameters()).device != device:  # (plan.py's fake parameters are already in place)
        model, ema = model.to(device), ema.to(device)
    wrapped = wrap(model, ema, cfg, device, distributed)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=0.0, betas=cfg.adamw_betas)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    return Student(model, wrapped, optimizer, scaler)


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step (Sec. 4): teacher targets for the whole step, then the student's loss and backward per
# micro-batch, then AdamW, the EMA and the centers, once per step, visibly here
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_targets(teacher, batches, teacher_temp, centers, cfg, dtype):
    """The teacher's targets for every micro-batch of the step -> {"dino", "ibot": PrototypeTargets}. One teacher
    pass per micro-batch keeps the heads' bottleneck features ([2B,b] and [M,b]); Sinkhorn-Knopp then normalises
    over the step's whole global batch (every micro-batch of every rank, as the official code does without
    accumulation), so the targets do not depend on how the batch is split. EMA centering uses the center."""
    with gathered(teacher), autocast(dtype, batches[0]["global_crops"].device):
        z = [teacher.teacher_features(b["global_crops"], b["mask_indices"]) for b in batches]
        heads = dict(dino=teacher.dino_head, ibot=teacher.ibot_head)
        targets = {k: PrototypeTargets([f[j].to(dtype) for f in z], heads[k].last_layer.weight.detach().to(dtype),
                                       teacher_temp, cfg.ibot_chunk_rows) for j, k in enumerate(heads)}
    for k, t in targets.items():  # EMA centering: softmax((t - c) / temp) = softmax(t / temp - c / temp)
        t.bias = (sinkhorn_knopp_bias(t, teacher_temp) if cfg.centering == "sinkhorn_knopp"
                  else -centers[k][0].float() / teacher_temp)
    return targets


def student_loss(model, batch, targets, i, cfg, dtype):
    """DINO + iBOT + KoLeo on micro-batch i (Sec. 4), losses in fp32 -> (total, dict of the three terms)."""
    device = batch["global_crops"].device
    with autocast(dtype, device):
        cls, dino_logits, ibot_z, prototypes = model(batch["global_crops"], batch["local_crops"],
                                                     batch["masks"], batch["mask_indices"])
    n_global = batch["global_crops"].shape[0]  # 2B
    B, K = n_global // 2, dino_logits.shape[-1]
    dino = dino_loss(dino_logits.float().view(-1, B, K), targets["dino"].probs(i).view(2, B, K),
                     cfg.student_temp)  # [2+n,B,K] vs [2,B,K]
    with autocast(dtype, device):  # the prototype scores at the heads' precision; the cross-entropy in fp32
        ibot = ibot_loss_in_chunks(ibot_z, prototypes, lambda rows: targets["ibot"].probs(i, rows),
                                   batch["mask_weights"], n_global, cfg.student_temp, cfg.ibot_chunk_rows)
    # KoLeo per global crop, never across views of one image; neighbours within groups of the global batch
    koleo = sum(koleo_loss(c, cfg.koleo_group_size) for c in cls.float().chunk(2))
    total = cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot + cfg.koleo_loss_weight * koleo
    return total, dict(dino=dino.detach(), ibot=ibot.detach(), koleo=koleo.detach())


def backward_micro_batch(student, batch, targets, i, n_micro, cfg, dtype):
    """Student loss on micro-batch i of n_micro, backward scaled by 1/n_micro (gradient accumulation); DDP
    all-reduces the gradients only on the last micro-batch. -> dict of the detached loss terms."""
    model, last = student.wrapped, i == n_micro - 1
    sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
    with sync:
        total, parts = student_loss(model, batch, targets, i, cfg, dtype)
        student.scaler.scale(total / n_micro).backward()
    return dict(loss=total.detach(), **parts)


def optimizer_step(student, hp, cfg):
    """This step's lr and weight decay, then clip each module's gradient norm to 3.0 (official: backbone, DINO
    head and iBOT head separately), AdamW step. The prototypes are frozen during the first epoch by a zero
    learning rate (build_schedules), as in the official code: their gradients still count in the clipping norm
    and warm up AdamW's moments. -> backbone gradient norm before clipping (a tensor: no host sync)."""
    optimizer, scaler, model = student.optimizer, student.scaler, student.model
    set_hyperparameters(optimizer, hp["lr"], hp["last_layer_lr"], hp["wd"])
    scaler.unscale_(optimizer)
    norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.clip_grad)
             for m in dict.fromkeys((model.backbone, model.dino_head, model.ibot_head))]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norms[0]


def new_centers(centers, targets, cfg):
    """EMA centering: the centers for the next step, from this step's teacher logits (the targets above used the
    old ones). Sinkhorn-Knopp keeps no state."""
    if cfg.centering != "ema":
        return centers
    return {k: update_center(centers[k], targets[k], cfg.center_momentum) for k in centers}


def mean_terms(parts):  # tensors: no host sync
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def train_step(student, teacher, batches, hp, centers, cfg, dtype):
    """One optimizer step of DINOv2 pretraining (Sec. 4) on the micro-batches of this rank; dtype: the
    forward passes' (Run.dtype). hp: this step's schedule values (lr, last_layer_lr, wd, momentum, teacher_temp).
    -> ({loss terms (mean over micro-batches), grad_norm}, new centers)."""
    targets = teacher_targets(teacher, batches, hp["teacher_temp"], centers, cfg, dtype)
    parts = [backward_micro_batch(student, batch, targets, i, len(batches), cfg, dtype)
             for i, batch in enumerate(batches)]
    grad_norm = optimizer_step(student, hp, cfg)
    ema_update(teacher, student.model, hp["momentum"])
    return dict(mean_terms(parts), grad_norm=grad_norm), new_centers(centers, targets, cfg)


def zero_centers(n_prototypes, device):  # EMA centering's state (Sinkhorn-Knopp keeps none)
    return dict(dino=torch.zeros(1, n_prototypes, device=device), ibot=torch.zeros(1, n_prototypes, device=device))


def step_seed(seed, it, rank):
    """Seed of the global torch RNG (drop path) at iteration `it`: a function of the step, so resuming is exact."""
    return int(np.random.SeedSequence([seed, it, rank, 1]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(path, cfg, model_args, step, student, teacher, centers):
    """Everything needed to continue exactly: {"config", "model_args", "step", "student"/"teacher" (the official
    layout: backbone.*, dino_head.*, ibot_head.*), "optimizer" (keyed by parameter name, so any layout resumes
    it), "scaler", "centers", "rng", "data"}; the data order and augmentations are functions of (seed, step,
    sample). Loads with torch.load(weights_only=True). A finished run also writes teacher_backbone.pth (the bare
    backbone, official keys) and teacher_backbone.json ({"model_args": ...})."""
    student_sd, teacher_sd, optim_sd = full_state_dicts(student.model, teacher, student.optimizer, cfg)
    if get_rank() == 0:
        atomic_save(dict(config=asdict(cfg), model_args=model_args, step=step, student=student_sd,
                         teacher=teacher_sd, optimizer=optim_sd, scaler=student.scaler.state_dict(),
                         centers=centers, rng=rng_states(), data=dict(seed=cfg.seed, step=step)), path)


def load_checkpoint(ckpt, student, teacher, cfg, device):
    """Restore a checkpoint written by save_checkpoint (opened by open_run_dir) -> (step, centers)."""
    load_state_dicts(student.model, teacher, student.optimizer, ckpt["student"], ckpt["teacher"],
                     ckpt["optimizer"], cfg)
    student.scaler.load_state_dict(ckpt["scaler"])
    set_rng_states(ckpt["rng"])
    return ckpt["step"], {k: v.to(device) for k, v in ckpt["centers"].items()}


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------
def train(cfg, dataset=None):
    """Pretrain with DINOv2 -> the raw (student, teacher) modules. `dataset` overrides cfg.data (tests). A run
    that reaches total_iters also saves the teacher backbone alone, the released artefact (official keys)."""
    run = start_run(cfg)
    ckpt = open_run_dir(cfg, run, RESUMABLE_CHANGES)  # before any work: a refused run costs nothing
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model, teacher, model_args = build_student_teacher(cfg)
    student = build_student(model, teacher, cfg, run.device)
    start, centers = 0, zero_centers(cfg.n_prototypes, run.device)  # centers: EMA centering only
    if ckpt:
        start, centers = load_checkpoint(ckpt, student, teacher, cfg, run.device)
        print0(f"resumed from {cfg.output_dir}/checkpoint.pth at iteration {start}")
    del ckpt  # a memory-mapped file: nothing of it stays in host memory
    splits = labelled_splits(cfg.data) if dataset is None and cfg.eval_every else None  # the k-NN monitor
    batches = Batches(dataset if dataset is not None else build_dataset(cfg.data, train=True), cfg, run)
    schedules, log, stop = build_schedules(cfg, run.lr, run.highres_lr), Progress(cfg, run, start), StopSignal()
    try:
        for it in range(start, run.stop_at):
            hp = {k: float(v[it]) for k, v in schedules.items()}
            size = int(hp["global_crop_size"])
            if size != batches.size:
                log.phase(it, f"global crops {size} px, lr {hp['lr']:.3g}, momentum {hp['momentum']:.4g}")
            micro_batches = batches.at(it, size)  # (before seeding: a new DataLoader draws from the global RNG)
            torch.manual_seed(step_seed(cfg.seed, it, run.rank))  # drop path draws: a function of the step
            with log.counting_flops():  # the first step on a GPU: its FLOPs, for MFU
                terms, centers = train_step(student, teacher, micro_batches, hp, centers, cfg, run.dtype)
            log.step(it, terms, hp)
            if splits and cfg.eval_every and (it + 1) % cfg.eval_every == 0:  # every rank: FSDP2 collectives
                acc = knn_eval(teacher.backbone, splits, cfg.global_crop_size, run.device,
                               autocast(run.dtype, run.device), cfg.knn_train_size, cfg.num_workers)
                log.write(dict(step=it + 1, knn_top1=acc), f"teacher k-NN top-1 {acc:.2f}% "
                          f"({cfg.knn_train_size} train images)")
            save, stopping = stop.check(it, run, cfg.checkpoint_every)
            if save:
                save_checkpoint(os.path.join(cfg.output_dir, "checkpoint.pth"), cfg, model_args, it + 1,
                                student, teacher, centers)
            if stopping:
                stop.exit(it)
    finally:
        stop.restore()
        log.close()
        release_lock(os.path.join(cfg.output_dir, "run.lock"))
    if run.stop_at == cfg.total_iters:
        teacher_sd = full_state_dicts(teacher, teacher, None, cfg)[0]  # every rank: FSDP2 gathers
        if run.rank == 0:
            save_backbone(os.path.join(cfg.output_dir, "teacher_backbone.pth"), teacher_sd, model_args)
    return model, teacher


def main():
    cfg, args = parse_config()
    _, _, device = setup_distributed()
    print0(cli.describe_overrides(cfg, args.preset, PRESETS, Config))
    t0 = time.perf_counter()
    with refusals():
        _, teacher = train(cfg)
    splits = labelled_splits(cfg.data) if cfg.stop_after in (0, cfg.total_iters) else None  # a finished run
    if splits:  # every rank: the ranks share the feature extraction
        dtype = DTYPES[resolve_precision(cfg.precision, device)[0]]
        acc = knn_eval(teacher.backbone, splits, cfg.global_crop_size, device, autocast(dtype, device),
                       num_workers=cfg.num_workers)
        print0(f"teacher k-NN (k=20, T=0.07) top-1 on the held-out split: {acc:.2f}% "
               f"({(time.perf_counter() - t0) / 60:.1f} min in total)")
    del teacher  # FSDP2 / DDP modules hold the process group: free them before it ends
    teardown_distributed()


if __name__ == "__main__":
    main()
