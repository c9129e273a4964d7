"""Distilling a large frozen DINOv2 model into smaller ones (arXiv 2304.07193, Sec. 5 "Distillation").

The paper trains ViT-g/14 once and distils it into ViT-S/B/L, which then beat the same architectures trained from
scratch (Tab. 5). The distillation loop is the pretraining loop of train.py with a few changes (Sec. 5): the
teacher is a frozen pretrained model instead of an EMA of the student, there is no masking and no stochastic
depth, the iBOT loss is applied to every patch token of the two global crops, and a spare EMA of each student
is kept and is the model that is saved and evaluated. As in DINOv3, several students can be trained in one run:
they share one teacher forward pass per batch. The step is train.train_step, the loop train.train_loop; data,
schedules, optimiser, distributed set-up and checkpoint files come from train.py and runtime.py; this file holds
only what differs.

Run:
    python train.py                                   # first: the tiny teacher (CPU demo), runs/tiny/checkpoint.pth
    python distill.py                                 # CPU demo: that teacher -> two smaller students, k-NN at the end
    python distill.py --preset paper --teacher runs/vitg/checkpoint.pth --students vit_small --micro_batch_size M
    torchrun --nproc_per_node=8 distill.py --preset paper --teacher runs/vitg/checkpoint.pth \
        --students vit_small,vit_base,vit_large --micro_batch_size M
    python distill.py --plan --preset paper ...       # per-GPU memory of that step; M from the README's plan
With no --preset the tiny CPU demo preset is used; --preset paper gives the dataclass defaults (Tab. 17).
--mask_probability > 0 masks the students as in pretraining (the paper's distillation has none).

Paper -> code
  Sec. 5, "a larger model as a frozen teacher" .................. load_teacher (needs the DINO and iBOT heads)
  Sec. 5, same losses: DINO (all crop pairs), iBOT, KoLeo ......... train.train_step (train.student_loss)
  Sec. 5, "remove the masking and stochastic depth" .............. DistillConfig: mask_probability 0, drop_path_rate 0
  Sec. 5, "apply the iBOT loss on the two global crops" .......... unmasked_batch (every patch token, weight 1/N)
  Sec. 5, "keep a spare EMA of the student ... our final model" .. train.Learner.ema, updated in train.train_step
  App. B, Tab. 17, distilled S/B/L: lr 1e-3 at batch 2048 ........ DistillConfig defaults
  DINOv3 (Simeoni et al. 2025), several students, one teacher .... train.train_step with several learners

Shape legend: B batch (images per micro-batch), N patch tokens per global crop, D width, K prototypes.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cli
from cli import one_of
from data import build_dataset, eval_transform, labelled_splits
from losses import is_dist
from model import ARCHS, DINOHead, DinoVisionTransformer, backbone_state_dict, infer_model_args
from runtime import (Progress, RunError, atomic_save, full_state_dicts, get_rank, learner_state, load_learner_state,
                     open_run_dir, print0, rng_states, save_backbone, set_rng_states, setup_distributed)
from train import (MODES, PRESETS, Batches, Config, DinoV2, autocast_for, build_learner, build_student_teacher,
                   derived_values, knn_eval, start_run, train_loop, zero_centers)


# ---------------------------------------------------------------------------------------------------------------
# Configuration: train.Config plus the teacher and the students; the defaults that differ are Sec. 5 / Tab. 17
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DistillConfig(Config):
    teacher: str = ""  # train.py checkpoint (checkpoint.pth) of the frozen teacher, with its DINO and iBOT heads
    students: str = "vit_small,vit_base,vit_large"  # comma-separated model.ARCHS keys; one teacher pass for all
    output_dir: str = "runs/distill"
    arch: str = ""  # unused: the teacher's architecture is read from its checkpoint, the students' from `students`
    drop_path_rate: float = 0.0  # Sec. 5: no stochastic depth in the students
    mask_probability: float = 0.0  # Sec. 5: no masking; the iBOT loss sees every patch of the global crops
    batch_size: int = 2048  # Tab. 17, distilled ViT-S/B/L
    base_lr: float = 1e-3 / math.sqrt(2)  # Tab. 17: lr 1e-3 at batch 2048 = base * sqrt(2048 / 1024)
    n_prototypes: int = 0  # unused: the students' heads get the teacher's number of prototypes

    def check_model(self):
        """The teacher's checkpoint fixes its architecture and the prototypes; setting them would be ignored,
        so it is refused. Every student must be a known architecture."""
        if self.arch or self.n_prototypes:
            raise ValueError("--arch / --n_prototypes: not used by distillation (the teacher's come from its "
                             "checkpoint, the students' from --students); allowed: leave them unset")
        for name in self.students.split(","):
            one_of("students", name, list(ARCHS))


# The paper's distilled S/B/L share one configuration (Tab. 17): the dataclass defaults, `--preset paper`.
DISTILL_PRESETS = {
    # CPU demo: the tiny teacher of `python train.py` distilled into a half-depth and a half-width student
    # (model.ARCHS vit_tiny_d2, vit_mini) on the same crops and patch size.
    "tiny": {**{k: v for k, v in PRESETS["tiny"].items() if k not in ("arch", "n_prototypes", "output_dir")},
             "teacher": "runs/tiny/checkpoint.pth", "students": "vit_tiny_d2,vit_mini",
             "output_dir": "runs/distill_tiny", "total_iters": 900, "warmup_iters": 90,
             "teacher_temp_warmup_iters": 0, "freeze_last_layer_iters": 0},
}


# ---------------------------------------------------------------------------------------------------------------
# The frozen teacher and the students
# ---------------------------------------------------------------------------------------------------------------
def head_from_state_dict(sd, in_dim):
    """A DINOHead shaped like the weights in sd (keys mlp.*, last_layer.weight_g/v), loaded strictly."""
    linears = sorted({k.rsplit(".", 1)[0] for k in sd if k.startswith("mlp") and k.endswith("weight")})
    K, bottleneck = sd["last_layer.weight_v"].shape
    hidden = sd[linears[0] + ".weight"].shape[0] if len(linears) > 1 else bottleneck
    head = DINOHead(in_dim, K, nlayers=len(linears), hidden_dim=hidden, bottleneck_dim=bottleneck,
                    mlp_bias=any(k.endswith("bias") for k in sd))
    head.load_state_dict(sd, strict=True)
    return head


def load_teacher(path):
    """Frozen teacher (backbone + DINO head + iBOT head) from a train.py or official training checkpoint.
    -> (DinoV2 in eval mode without gradients, backbone kwargs). The distillation targets are the teacher's
    distributions over its prototypes, so a checkpoint without heads cannot be used."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"teacher checkpoint {path!r} not found: train one with `python train.py` "
                                f"(writes runs/tiny/checkpoint.pth) and pass --teacher <checkpoint.pth>")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt.get("teacher", {}) if isinstance(ckpt, dict) else {}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    heads = {h: {k.removeprefix(h + "."): v for k, v in sd.items() if k.startswith(h + ".")}
             for h in ("dino_head", "ibot_head")}
    if not heads["dino_head"]:
        raise RunError(
            f"{path} holds no DINO head (no 'teacher' entry with 'dino_head.*' keys). Distillation trains the "
            f"students to match the teacher's distributions over its prototypes (Sec. 5), which come from the DINO "
            f"and iBOT heads. Released backbones (dinov2_vit*14_pretrain.pth) and teacher_backbone.pth ship without "
            f"heads; use the full training checkpoint (train.py's checkpoint.pth, or the official "
            f"training_*/teacher_checkpoint.pth).")
    if not heads["ibot_head"]:  # official configs with ibot.separate_head=False share the DINO head (tied heads)
        print0(f"{path}: no iBOT head, using the DINO head for the patch tokens (tied heads)")
        heads["ibot_head"] = heads["dino_head"]
    backbone_sd = backbone_state_dict(ckpt)
    model_args = ckpt.get("model_args") or infer_model_args(backbone_sd)
    backbone = DinoVisionTransformer(**model_args)
    backbone.load_state_dict(backbone_sd, strict=True)
    D = backbone.embed_dim
    teacher = DinoV2(backbone, head_from_state_dict(heads["dino_head"], D), head_from_state_dict(heads["ibot_head"], D))
    return teacher.requires_grad_(False).eval(), model_args


def student_config(cfg, name, n_prototypes):
    """The train.Config that builds student `name` (with the teacher's number of prototypes)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config)}
    return Config(**{**shared, "arch": name, "n_prototypes": n_prototypes})


def build_student(cfg, name, n_prototypes, device):
    """A student (train.Learner) with its own DINO/iBOT heads over the teacher's K prototypes; its EMA starts
    as a copy. -> (learner, model_args)."""
    # the "teacher" that train.py builds beside a student is exactly the spare EMA copy distillation needs
    model, ema, model_args = build_student_teacher(student_config(cfg, name, n_prototypes))
    return build_learner(name, model, ema, cfg, device), model_args


# ---------------------------------------------------------------------------------------------------------------
# Batches without masking (Sec. 5); the step itself is train.train_step (one teacher pass for all students)
# ---------------------------------------------------------------------------------------------------------------
def unmasked_batch(batch, patch_size):
    """Sec. 5: no masking, iBOT on every patch of the global crops: masks=None and each token weighted 1/N, so
    ibot_loss is the mean cross-entropy over all patch tokens of each crop."""
    n_crops, _, H, W = batch["global_crops"].shape
    N = (H // patch_size) * (W // patch_size)
    weights = torch.full((n_crops * N,), 1.0 / N, device=batch["global_crops"].device)  # [2B*N]
    return {**batch, "masks": None, "mask_indices": None, "mask_weights": weights}


def prepare_batch(cfg, batch):
    """The paper's distillation batch (no masking) unless masking is asked for (--mask_probability > 0: the
    students are then masked and the iBOT loss sees the masked patches, as in pretraining)."""
    return unmasked_batch(batch, cfg.patch_size) if cfg.mask_probability == 0 else batch


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one file with every student (and its EMA), written atomically; resumable exactly
# ---------------------------------------------------------------------------------------------------------------
def save_distill_checkpoint(path, cfg, step, students, model_args, centers):
    entries = []
    for st in students:  # every rank gathers (FSDP2), rank 0 writes
        entries.append(dict(name=st.name, model_args=model_args[st.name], **learner_state(st, cfg)))
    if get_rank() == 0:
        atomic_save(dict(config=asdict(cfg), step=step, students=entries, centers=centers, rng=rng_states(),
                         data=dict(seed=cfg.seed, step=step)), path)


def load_distill_checkpoint(ckpt, students, cfg, device):
    """Restore every student (FSDP2: each rank keeps its shards) -> (step, centers)."""
    saved = [e["name"] for e in ckpt["students"]]
    if saved != [st.name for st in students]:
        raise RunError(f"the checkpoint holds students {saved}, this run asks for {[st.name for st in students]}")
    for st, entry in zip(students, ckpt["students"]):
        load_learner_state(st, entry, cfg)
    set_rng_states(ckpt["rng"])
    return ckpt["step"], {k: v.to(device) for k, v in ckpt["centers"].items()}


# ---------------------------------------------------------------------------------------------------------------
# The distillation loop
# ---------------------------------------------------------------------------------------------------------------
def distill(cfg, dataset=None):
    """Distil cfg.teacher into each of cfg.students -> (teacher, [train.Learner]). `dataset` overrides cfg.data."""
    run = start_run(cfg)
    ckpt_path, ckpt = os.path.join(cfg.output_dir, "checkpoint.pth"), open_run_dir(cfg, run)  # before any work
    teacher, teacher_args = load_teacher(cfg.teacher)
    if teacher_args["patch_size"] != cfg.patch_size:  # the iBOT loss compares patch tokens position by position
        raise RunError(f"--patch_size: {cfg.patch_size} differs from the teacher's {teacher_args['patch_size']}")
    teacher = teacher.to(run.device)
    K = teacher.dino_head.last_layer.weight_v.shape[0]
    torch.manual_seed(cfg.seed)  # same initial students on every rank
    built = [build_student(cfg, name, K, run.device) for name in cfg.students.split(",")]
    students, model_args = [st for st, _ in built], {st.name: args for st, args in built}
    centers, start = zero_centers(K, run.device), 0
    if ckpt:
        start, centers = load_distill_checkpoint(ckpt, students, cfg, run.device)
        print0(f"resumed from {ckpt_path} at iteration {start}")
    dataset = dataset if dataset is not None else build_dataset(cfg.data, train=True)
    batches = Batches(dataset, cfg, run, prepare=lambda b: prepare_batch(cfg, b))
    log = Progress(cfg, run, start, "distill")
    save = lambda step, c: save_distill_checkpoint(ckpt_path, cfg, step, students, model_args, c)
    train_loop(cfg, run, students, teacher, centers, batches, start, save, log)
    if run.stop_at == cfg.total_iters:
        for st in students:  # the EMA backbone alone, official key layout + sidecar json (model.load_model)
            ema_sd = full_state_dicts(st.model, st.ema, None, cfg)[1]
            if run.rank == 0:
                save_backbone(os.path.join(cfg.output_dir, f"{st.name}_backbone.pth"), ema_sd,
                              model_args[st.name])
    return teacher, students


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the teacher, and main
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def similarity_agreement(backbone_a, backbone_b, images):
    """Cosine similarity between the two models' class-token similarity matrices on the same images [B,3,H,W]:
    1 when both embed the images with the same geometry. Defined for models of different widths, where the class
    tokens themselves cannot be compared."""
    grams = []
    for m in (backbone_a, backbone_b):
        f = F.normalize(m.eval()(images).float(), dim=-1)  # [B,D]
        grams.append((f @ f.T).flatten())  # [B*B]
    return F.cosine_similarity(grams[0], grams[1], dim=0).item()


def report(cfg, teacher, students, device, n_probe=256):
    """k-NN top-1 of the teacher and of each student's EMA (k=20, T=0.07), and each student's agreement with the
    teacher on n_probe held-out images -> {model: {"knn_top1": % or None without labels, "agreement": cos}}."""
    splits = labelled_splits(cfg.data)
    held_out = splits[1] if splits else build_dataset(cfg.data, train=True)
    probe = torch.stack([eval_transform(held_out[i][0], cfg.global_crop_size)
                         for i in range(min(n_probe, len(held_out)))]).to(device)  # [n,3,G,G]
    knn = lambda backbone: (knn_eval(backbone, splits, cfg.global_crop_size, device, autocast_for(cfg, device))
                            if splits else None)
    results = {"teacher": dict(knn_top1=knn(teacher.backbone), agreement=1.0)}
    for st in students:
        results[f"{st.name} (EMA)"] = dict(knn_top1=knn(st.ema.backbone),
                                           agreement=similarity_agreement(st.ema.backbone, teacher.backbone, probe))
    return results


def main():
    cfg, args = cli.parse_config(DistillConfig, presets=DISTILL_PRESETS, default_preset="tiny",
                                 prog="distill.py",
                                 extra_flags=[m for m in MODES if m[0] in ("plan", "gpu_memory_gb")],
                                 description="Distil a frozen DINOv2 teacher into smaller students (Sec. 5). "
                                             "With no --preset the tiny CPU demo preset applies.")
    if args.plan:
        import plan
        return plan.main_distill(cfg, args)
    print(cli.describe_overrides(cfg, args.preset, DISTILL_PRESETS, DistillConfig), flush=True)
    _, world_size, device = setup_distributed()
    t0 = time.perf_counter()
    try:
        derived_values(cfg, world_size)
        teacher, students = distill(cfg)
    except (RunError, FileNotFoundError) as e:
        cli.error(str(e))
    if min(cfg.stop_after or cfg.total_iters, cfg.total_iters) < cfg.total_iters:
        return  # stopped early on purpose: no evaluation
    results = report(cfg, teacher, students, device)
    print0(f"\n{'model':24s} k-NN top-1  agreement   ({(time.perf_counter() - t0) / 60:.1f} min)")
    for name, r in results.items():
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.2f}%"
        print0(f"{name:24s} {knn:>10s}  {r['agreement']:9.3f}")
    if get_rank() == 0:
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    if is_dist():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
