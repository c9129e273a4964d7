"""Distilling a large frozen DINOv2 model into smaller ones (arXiv 2304.07193, Sec. 5 "Distillation").

The paper trains ViT-g/14 once and distils it into ViT-S/B/L, which then beat the same architectures trained from
scratch (Tab. 5). Distillation is pretraining with a few changes (Sec. 5): the teacher is a frozen pretrained
model instead of an EMA of the student, there is no masking and no stochastic depth, the iBOT loss is applied to
every patch token of the two global crops, and a spare EMA of each student is kept and is the model that is
saved and evaluated. As in DINOv3, several students can be trained in one run: they share one teacher pass per
step. distill_step composes train.py's named parts (teacher_targets, backward_micro_batch, optimizer_step,
ema_update); data, schedules and the optimiser come from train.py, processes and checkpoint files from
runtime.py; this file holds only what differs.

Run:
    python train.py                                   # first: the tiny teacher (CPU demo), runs/tiny/checkpoint.pth
    python distill.py                                 # CPU demo: that teacher -> two smaller students, k-NN at the end
    python distill.py --preset paper --teacher runs/vitg/checkpoint.pth --students vit_small --micro_batch_size M
    torchrun --nproc_per_node=8 distill.py --preset paper --teacher runs/vitg/checkpoint.pth \
        --students vit_small,vit_base,vit_large --micro_batch_size M
    python plan.py distill --preset paper ...         # per-GPU memory of that step; M from the README's plan
With no --preset the tiny CPU demo preset is used; --preset paper gives the dataclass defaults (Tab. 17).
--mask_probability > 0 masks the students as in pretraining (the paper's distillation has none).

Paper -> code
  Sec. 5, "a larger model as a frozen teacher" .................. load_teacher (needs the DINO and iBOT heads)
  Sec. 5, same losses: DINO (all crop pairs), iBOT, KoLeo ......... distill_step (train.backward_micro_batch)
  Sec. 5, "remove the masking and stochastic depth" .............. DistillConfig: mask_probability 0, drop_path_rate 0
  Sec. 5, "apply the iBOT loss on the two global crops" .......... unmasked_batch (every patch token, weight 1/N)
  Sec. 5, "keep a spare EMA of the student ... our final model" .. Distilled.ema, updated in distill_step
  App. B, Tab. 17, distilled S/B/L: lr 1e-3 at batch 2048 ........ DistillConfig defaults
  DINOv3 (Simeoni et al. 2025), several students, one teacher .... distill_step over a list of students

Shape legend: B batch (images per micro-batch), N patch tokens per global crop, D width, K prototypes.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import cli
from cli import one_of
from data import Batches, build_dataset, eval_transform, knn_eval, labelled_splits
from losses import ibot_mask_weights
from model import ARCHS, DINOHead, DinoVisionTransformer, backbone_state_dict, infer_model_args
from runtime import (DTYPES, Progress, RunError, StopSignal, atomic_save, autocast,
                     full_state_dicts, get_rank, load_state_dicts, open_run_dir, print0, refusals,
                     release_lock, resolve_precision, rng_states, save_backbone, set_rng_states,
                     setup_distributed, start_run, teardown_distributed)
from train import (PRESETS, RESUMABLE_CHANGES, Config, DinoV2, backward_micro_batch,
                   build_schedules, build_student, build_student_teacher, ema_update, mean_terms, new_centers,
                   optimizer_step, step_seed, teacher_targets, zero_centers)


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
    koleo_group_size: int = 16  # KoLeo neighbours among this many consecutive images (DINOv3's group size)

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
    "tiny": {**{k: v for k, v in PRESETS["tiny"].items()
                if k not in ("arch", "n_prototypes", "output_dir", "koleo_group_size")},
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


@dataclass
class Distilled:
    """One student: its name (a model.ARCHS key), what learns (train.Student), its spare EMA (Sec. 5: the model
    that is saved and evaluated) and the EMA backbone's model_args."""
    name: str
    student: object
    ema: DinoV2
    model_args: dict


def build_distilled(cfg, name, n_prototypes, device, distributed=True):
    """A student with its own DINO/iBOT heads over the teacher's K prototypes; its EMA starts as a copy (the
    "teacher" that train.build_student_teacher builds beside a student is exactly that spare EMA)."""
    model, ema, model_args = build_student_teacher(student_config(cfg, name, n_prototypes))
    if cfg.mask_probability == 0:  # no masking (Sec. 5): the mask token is unused, and DDP would wait for its
        model.backbone.mask_token.requires_grad_(False)  # gradient ("Expected to have finished reduction")
    return Distilled(name, build_student(model, ema, cfg, device, distributed), ema, model_args)


# ---------------------------------------------------------------------------------------------------------------
# Batches without masking, and the step: train.py's named parts, one teacher pass for every student
# ---------------------------------------------------------------------------------------------------------------
def unmasked_batch(batch, patch_size):
    """Sec. 5: no masking, iBOT on every patch of the global crops: masks=None and each token weighted 1/N (every
    patch counts as masked: losses.ibot_mask_weights), so ibot_loss is the mean cross-entropy per crop."""
    n_crops, _, H, W = batch["global_crops"].shape
    every_patch = torch.ones(n_crops, (H // patch_size) * (W // patch_size), dtype=torch.bool,
                             device=batch["global_crops"].device)  # [2B,N]
    return {**batch, "masks": None, "mask_indices": None, "mask_weights": ibot_mask_weights(every_patch)}


def prepare_batch(cfg, batch):
    """The paper's distillation batch (no masking) unless masking is asked for (--mask_probability > 0: the
    students are then masked and the iBOT loss sees the masked patches, as in pretraining)."""
    return unmasked_batch(batch, cfg.patch_size) if cfg.mask_probability == 0 else batch


def distill_step(students, teacher, batches, hp, centers, cfg, dtype):
    """One optimizer step of every student: the frozen teacher's targets for the whole step (once, shared), then
    per student its loss and backward on each micro-batch, its AdamW step and its spare EMA.
    -> ({"<student>/<term>": value}, new centers)."""
    targets = teacher_targets(teacher, batches, hp["teacher_temp"], centers, cfg, dtype)
    terms = {}
    for st in students:
        parts = [backward_micro_batch(st.student, batch, targets, i, len(batches), cfg, dtype)
                 for i, batch in enumerate(batches)]
        grad_norm = optimizer_step(st.student, hp, cfg)
        ema_update(st.ema, st.student.model, hp["momentum"])
        terms.update({f"{st.name}/{k}": v for k, v in dict(mean_terms(parts), grad_norm=grad_norm).items()})
    return terms, new_centers(centers, targets, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: one file with every student (and its EMA), written atomically; resumable exactly
# ---------------------------------------------------------------------------------------------------------------
def save_distill_checkpoint(path, cfg, step, students, centers):
    entries = []
    for st in students:  # every rank gathers (FSDP2), rank 0 writes
        model_sd, ema_sd, optim_sd = full_state_dicts(st.student.model, st.ema, st.student.optimizer, cfg)
        entries.append(dict(name=st.name, model_args=st.model_args, student=model_sd, ema=ema_sd,
                            optimizer=optim_sd, scaler=st.student.scaler.state_dict()))
    if get_rank() == 0:
        atomic_save(dict(config=asdict(cfg), step=step, students=entries, centers=centers, rng=rng_states(),
                         data=dict(seed=cfg.seed, step=step)), path)


def load_distill_checkpoint(ckpt, students, cfg, device):
    """Restore every student (FSDP2: each rank keeps its shards) -> (step, centers)."""
    saved = [e["name"] for e in ckpt["students"]]
    if saved != [st.name for st in students]:
        raise RunError(f"the checkpoint holds students {saved}, this run asks for {[st.name for st in students]}")
    for st, e in zip(students, ckpt["students"]):
        load_state_dicts(st.student.model, st.ema, st.student.optimizer, e["student"], e["ema"], e["optimizer"],
                         cfg)
        st.student.scaler.load_state_dict(e["scaler"])
    set_rng_states(ckpt["rng"])
    return ckpt["step"], {k: v.to(device) for k, v in ckpt["centers"].items()}


# ---------------------------------------------------------------------------------------------------------------
# The distillation loop
# ---------------------------------------------------------------------------------------------------------------
def distill(cfg, dataset=None):
    """Distil cfg.teacher into each of cfg.students -> (teacher, [Distilled]). `dataset` overrides cfg.data."""
    run = start_run(cfg)
    ckpt = open_run_dir(cfg, run, RESUMABLE_CHANGES)  # before any work: a refused run costs nothing
    teacher, teacher_args = load_teacher(cfg.teacher)
    if teacher_args["patch_size"] != cfg.patch_size:  # the iBOT loss compares patch tokens position by position
        raise RunError(f"--patch_size: {cfg.patch_size} differs from the teacher's {teacher_args['patch_size']}")
    teacher = teacher.to(run.device)
    K = teacher.dino_head.last_layer.weight_v.shape[0]
    torch.manual_seed(cfg.seed)  # same initial students on every rank
    students = [build_distilled(cfg, name, K, run.device) for name in cfg.students.split(",")]
    start, centers = 0, zero_centers(K, run.device)
    if ckpt:
        start, centers = load_distill_checkpoint(ckpt, students, cfg, run.device)
        print0(f"resumed from {cfg.output_dir}/checkpoint.pth at iteration {start}")
    del ckpt
    dataset = dataset if dataset is not None else build_dataset(cfg.data, train=True)
    batches = Batches(dataset, cfg, run, prepare=lambda b: prepare_batch(cfg, b))
    schedules, log, stop = build_schedules(cfg, run.lr, run.highres_lr), Progress(cfg, run, start, "distill"), StopSignal()
    try:
        for it in range(start, run.stop_at):
            hp = {k: float(v[it]) for k, v in schedules.items()}
            micro_batches = batches.at(it, int(hp["global_crop_size"]))
            torch.manual_seed(step_seed(cfg.seed, it, run.rank))
            terms, centers = distill_step(students, teacher, micro_batches, hp, centers, cfg, run.dtype)
            log.step(it, terms, hp)
            save, stopping = stop.check(it, run, cfg.checkpoint_every)
            if save:
                save_distill_checkpoint(os.path.join(cfg.output_dir, "checkpoint.pth"), cfg, it + 1, students,
                                        centers)
            if stopping:
                stop.exit(it)
    finally:
        stop.restore()
        log.close()
        release_lock(os.path.join(cfg.output_dir, "run.lock"))
    if run.stop_at == cfg.total_iters:
        for st in students:  # the EMA backbone alone, official key layout + sidecar json (model.load_model)
            ema_sd = full_state_dicts(st.ema, st.ema, None, cfg)[0]
            if run.rank == 0:
                save_backbone(os.path.join(cfg.output_dir, f"{st.name}_backbone.pth"), ema_sd, st.model_args)
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


def report(cfg, teacher, students, device, dtype, n_probe=256):
    """k-NN top-1 of the teacher and of each student's EMA (k=20, T=0.07), and each student's agreement with the
    teacher on n_probe held-out images -> {model: {"knn_top1": % or None without labels, "agreement": cos}}.
    Every rank calls it (the ranks share the k-NN's feature extraction)."""
    splits = labelled_splits(cfg.data)
    held_out = splits[1] if splits else build_dataset(cfg.data, train=True)
    probe = torch.stack([eval_transform(held_out[i][0], cfg.global_crop_size)
                         for i in range(min(n_probe, len(held_out)))]).to(device)  # [n,3,G,G]

    def knn(backbone):
        return knn_eval(backbone, splits, cfg.global_crop_size, device, autocast(dtype, device),
                        num_workers=cfg.num_workers) if splits else None
    results = {"teacher": dict(knn_top1=knn(teacher.backbone), agreement=1.0)}
    for st in students:
        results[f"{st.name} (EMA)"] = dict(knn_top1=knn(st.ema.backbone),
                                           agreement=similarity_agreement(st.ema.backbone, teacher.backbone, probe))
    return results


def print_report(cfg, results):
    """The report as a table on the console and as output_dir/results.json."""
    print0(f"\n{'model':24s} k-NN top-1  agreement")
    for name, r in results.items():
        knn = "-" if r["knn_top1"] is None else f"{r['knn_top1']:.2f}%"
        print0(f"{name:24s} {knn:>10s}  {r['agreement']:9.3f}")
    if get_rank() == 0:
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)


def main():
    cfg, args = cli.parse_config(DistillConfig, presets=DISTILL_PRESETS, default_preset="tiny", prog="distill.py",
                                 description="Distil a frozen DINOv2 teacher into smaller students (Sec. 5). "
                                             "With no --preset the tiny CPU demo preset applies.")
    _, _, device = setup_distributed()
    print0(cli.describe_overrides(cfg, args.preset, DISTILL_PRESETS, DistillConfig))
    t0 = time.perf_counter()
    with refusals():
        teacher, students = distill(cfg)
    if cfg.stop_after in (0, cfg.total_iters):  # a finished run: how close each student came to the teacher
        dtype = DTYPES[resolve_precision(cfg.precision, device)[0]]
        print_report(cfg, report(cfg, teacher, students, device, dtype))
    print0(f"distill.py: {(time.perf_counter() - t0) / 60:.1f} min in total")
    del teacher, students  # DDP / FSDP2 modules hold the process group: free them before it ends
    teardown_distributed()


if __name__ == "__main__":
    main()
