"""Will a DINOv2 run fit, and what will it cost? The plan of one step per GPU and of the whole run, without a GPU.

A training run on GPUs fails late and expensively when one step does not fit. `python plan.py train` traces the
product's own step (train.train_step: teacher targets, student forward/backward, AdamW, EMA; distill.distill_step
for `distill`) on fake tensors (torch FakeTensorMode: shapes and dtypes, no data) and reports, per GPU, the peak
memory of parameters, gradients, AdamW state, activations and temporaries (MemTracker) and the FLOPs per image
(FlopCounterMode); given a GPU size, the largest micro-batch that fits in each phase. Blocks of one model are
identical, so the plan traces copies with 2 and 4 blocks and extrapolates linearly to the full depth (exact for
one model's blocks; for the several models of a distillation the blocks of each are extrapolated separately and
added); micro-batches above 16 images are the line through traces at 8 and 16. The traces run in parallel
processes. Then the run at a glance: each phase of the schedule with its steps, crops, lr and momentum, images
seen and GPU-hours.

Run (the same flags as train.py / distill.py, plus the plan's own):
    python plan.py train --preset vit_s --micro_batch_size 128                 # one GPU
    python plan.py train --preset vit_l --world_size 8                         # per GPU of an 8-GPU run
    python plan.py train --preset vit_g --fsdp --activation_checkpointing --world_size 128
    python plan.py distill --preset paper --students vit_small,vit_base,vit_large --world_size 8 --micro_batch_size 8
The README lists the plans of its GPU commands; `python bench.py step` measures a step beside its plan.

Sec. 5 (efficient implementation) -> code: FSDP sharding of parameters, gradients and AdamW state (divided by
the world size here), mixed precision (the trace runs the config's precision), activation checkpointing.
"""
import contextlib
import dataclasses
import gc
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import cli
import distill as DI
import train as T
from augment import MultiCropCollate
from runtime import DTYPES, PEAK_BF16_TFLOPS, layout

CPU = torch.device("cpu")
GiB = 2 ** 30
KINDS = ("param", "buffer", "grad", "act", "temp", "opt", "oth")  # MemTracker's categories


# ---------------------------------------------------------------------------------------------------------------
# Tracing one step on fake tensors
# ---------------------------------------------------------------------------------------------------------------
def real_batch(cfg, micro_batch, global_crop_size=None):
    """A micro-batch from the real collate on random images (the mask counts are real, so M is exact)."""
    size = global_crop_size or cfg.global_crop_size
    collate = MultiCropCollate(size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size,
                               mask_ratio=cfg.mask_ratio, mask_probability=cfg.mask_probability,
                               seed=cfg.seed, global_batch=micro_batch)
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, size, size, generator=g), 0, (0, j)) for j in range(micro_batch)]
    return collate(images)


def pretraining(cfg, depths):
    """train()'s networks, each model `depths` blocks deep -> ([(student, its EMA)], teacher, step, prepare).
    In pretraining the EMA is the teacher."""
    student, teacher, _ = T.build_student_teacher(cfg, depths[0])
    step = lambda students, batches, hp, centers, dtype: T.train_step(students[0], teacher, batches, hp,
                                                                      centers, cfg, dtype)
    return [(student, teacher)], teacher, step, None


def teacher_config(cfg):
    """The frozen teacher's train.Config: its checkpoint's, or the paper's ViT-g/14 (no checkpoint yet)."""
    if cfg.teacher and os.path.exists(cfg.teacher):
        saved = torch.load(cfg.teacher, map_location="cpu", weights_only=True, mmap=True).get("config", {})
        fields = {f.name for f in dataclasses.fields(T.Config)}
        return T.Config(**{k: v for k, v in saved.items() if k in fields})
    return T.Config(patch_size=cfg.patch_size, global_crop_size=cfg.global_crop_size)


def distillation(cfg, depths):
    """distill()'s networks: the frozen teacher (depths[0] blocks) and the students (depths[1:])."""
    tcfg = teacher_config(cfg)
    _, teacher, _ = T.build_student_teacher(tcfg, depths[0])
    pairs = [T.build_student_teacher(DI.student_config(cfg, name, tcfg.n_prototypes), d)[:2]
             for name, d in zip(cfg.students.split(","), depths[1:])]
    for student, _ in pairs:
        student.backbone.mask_token.requires_grad_(cfg.mask_probability > 0)  # as distill.build_distilled

    def step(students, batches, hp, centers, dtype):
        named = [DI.Distilled(f"s{i}", st, st_ema, {}) for i, (st, (_, st_ema)) in enumerate(zip(students, pairs))]
        return DI.distill_step(named, teacher, batches, hp, centers, cfg, dtype)
    return pairs, teacher, step, lambda batch: DI.prepare_batch(cfg, batch)


def full_depths(cfg, kind):
    if kind is pretraining:
        return [T.ARCHS[cfg.arch]["depth"]]
    return [T.ARCHS[teacher_config(cfg).arch]["depth"]] + [T.ARCHS[n]["depth"] for n in cfg.students.split(",")]


@contextlib.contextmanager
def no_gc():
    """Python's cyclic garbage collector off: when it runs would change what is alive at the peak, and so the
    traced peak would depend on what the process did before."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def peak_tracker():
    """torch's MemTracker keeping only the step's peak: it also records every module's own peak after each
    operation, which plan.py does not use and which takes most of a trace's time."""
    from torch.distributed._tools import mem_tracker as mt

    class PeakTracker(mt.MemTracker):
        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mt._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mt._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)
    return PeakTracker()


def trace_step(cfg, micro_batch, kind=pretraining, depths=None, memory=True, global_crop_size=None):
    """Run the step on fake tensors and count its FLOPs; with memory, run it twice and measure the second
    (AdamW's state exists then, as in every later step). depths: blocks of each model (default: full).
    -> dict(flops, and with memory MemTracker's bytes at the peak by kind ("param", "grad", "opt", "act",
    "temp", ...) and "total", and "gathered": bytes FSDP2 keeps whole (the root's own parameters: the heads))."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    if cfg.attn_impl == "auto":  # on a GPU "auto" is the fused kernel; on the fake CPU trace it could differ
        cfg = dataclasses.replace(cfg, attn_impl="fused")
    cfg = dataclasses.replace(cfg, compile=False)
    with torch.device("meta"):  # weight initialisation reads values, which fake tensors do not have
        pairs, teacher, step, prepare = kind(cfg, depths or full_depths(cfg, kind))
    batch = real_batch(cfg, micro_batch, global_crop_size)
    batch = prepare(batch) if prepare else batch
    dtype = DTYPES["bf16" if cfg.precision == "auto" else cfg.precision]  # what a GPU computes in
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        teacher = teacher if any(teacher is ema for _, ema in pairs) else teacher.to_empty(device=CPU)
        students = [T.build_student(st.to_empty(device=CPU), ema.to_empty(device=CPU), cfg, CPU, distributed=False)
                    for st, ema in pairs]
        fake = {k: (mode.from_tensor(v) if v is not None else None) for k, v in batch.items()}
        centers = T.zero_centers(teacher.dino_head.last_layer.weight_v.shape[0], CPU)
        hp = dict(lr=1e-4, last_layer_lr=1e-4, wd=cfg.weight_decay, momentum=cfg.momentum_teacher,
                  teacher_temp=cfg.teacher_temp)
        flops = FlopCounterMode(display=False)  # the first step: its FLOPs, and it creates AdamW's state
        with flops, no_gc():
            step(students, [fake], hp, centers, dtype)
        if memory:  # a second step, as every later one, without the FLOP counter: its module hooks keep the
            tracker = peak_tracker()  # activations of checkpointed blocks alive to the step's end
            for m in (teacher, *(s.model for s in students)):  # MemTracker hooks every parameter of a module it
                m.requires_grad_(True)  # sees run (frozen ones too: the teacher runs under no_grad,
            for s, (_, ema) in zip(students, pairs):  # distillation's mask token is unused: no gradient)
                tracker.track_external(s.model, ema, s.optimizer)
            tracker.track_external(teacher)
            with tracker, no_gc():
                step(students, [fake], hp, centers, dtype)
    out = dict(flops=flops.get_total_flops())
    if memory:
        by_kind = next(iter(tracker.get_tracker_snapshot("peak").values()))  # one device: {kind: bytes}
        out.update({str(k).lower().removeprefix("_memreftype."): v for k, v in by_kind.items()})
        size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
        out["gathered"] = max(size(s.model.dino_head) + size(s.model.ibot_head) for s in students)
        out["block"] = max(size(s.model.backbone.blocks[0]) for s in students)
    return out


SHALLOW = (2, 4)  # blocks of the two traced copies (the peak moves by a block pair, so both are even)
TRACED_MICRO_BATCH = 16  # larger micro-batches are extrapolated from traces at 8 and 16 images


def at_full_depth(cfg, micro_batch, kind=pretraining, memory=True, global_crop_size=None, run=map):
    """trace_step at the full depth of every model, from shallow copies: X(D) = X(2) + (D - 2) (X(4) - X(2)) / 2
    for each model deeper than 4 blocks (its blocks are identical); the models of a distillation add theirs.
    run: how the traces run (map: one after the other; an executor's map: in parallel processes)."""
    full = full_depths(cfg, kind)
    base_depths = [min(d, SHALLOW[0]) for d in full]
    deeper = {i: min(d, SHALLOW[1]) for i, d in enumerate(full) if d > SHALLOW[0]}
    depth_sets = [base_depths] + [base_depths[:i] + [d] + base_depths[i + 1:] for i, d in deeper.items()]
    n = len(depth_sets)
    base, *traces = run(trace_step, [cfg] * n, [micro_batch] * n, [kind] * n, depth_sets, [memory] * n,
                        [global_crop_size] * n)
    out = dict(base)
    for (i, d), trace in zip(deeper.items(), traces):
        for k in base:
            if k not in ("gathered", "block"):
                out[k] += (trace[k] - base[k]) * (full[i] - SHALLOW[0]) / (d - SHALLOW[0])
    return out


def extrapolated(cfg, micro_batch, kind=pretraining, memory=True, global_crop_size=None,
                 traced=TRACED_MICRO_BATCH, run=map):
    """at_full_depth for `micro_batch` images, traced at no more than `traced`: beyond, every count is the line
    through the traces at traced / 2 and traced images: FLOPs grow exactly with the images, the peak does as long
    as the same moment of the step is the peak at both and at micro_batch (the one whose activations grow
    fastest, as the micro-batch grows)."""
    if micro_batch <= traced:
        return at_full_depth(cfg, micro_batch, kind, memory, global_crop_size, run)
    half, top = (at_full_depth(cfg, m, kind, memory, global_crop_size, run) for m in (traced // 2, traced))
    per_image = lambda k: (top[k] - half[k]) / (traced - traced // 2)
    line = lambda k: top[k] + (micro_batch - traced) * per_image(k)
    out = dict(top, flops=line("flops"))
    if memory:  # the peak's images part (activations, temporaries) as composed at `traced`, scaled to the line
        dynamic = [k for k in ("act", "temp", "oth") if k in top]
        static = top["total"] - sum(top[k] for k in dynamic)
        out["total"] = line("total")
        out.update({k: top[k] * (out["total"] - static) / (top["total"] - static) for k in dynamic})
        out["per_image"] = per_image("total")  # bytes of the peak per image: fit() draws its line
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-GPU memory: the one-process trace adjusted for DDP buckets or FSDP2 shards
# ---------------------------------------------------------------------------------------------------------------
def per_gpu_memory(cfg, trace, world_size):
    """Peak bytes on one GPU from a one-process trace. DDP keeps a full copy of everything plus gradient buckets
    as large as the gradients; FSDP2 divides parameters, gradients and AdamW state by the world size, gathers
    about two blocks' parameters at a time (the one computing and the one prefetched) and keeps the heads (the
    root's own parameters) and their gradients whole through the step."""
    static = trace["param"] + trace["grad"] + trace["opt"]
    dynamic = trace["total"] - static
    if cfg.fsdp and world_size > 1:
        return static / world_size + dynamic + 2 * trace["block"] + 2 * trace["gathered"]
    return trace["total"] + (trace["grad"] if world_size > 1 else 0)


def fit(cfg, trace, world_size, gpu_gb):
    """-> (peak bytes, largest micro-batch that divides the per-GPU batch and fits 90% of the GPU, the peak's
    line in the micro-batch: bytes at 0 images and per image). The line goes through the traces at two
    micro-batches where extrapolated() drew it; otherwise all but parameters, gradients, optimizer state and
    buffers is taken to grow in proportion to the images."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    peak = per_gpu_memory(cfg, trace, world_size)  # the images' bytes count once per GPU in DDP and FSDP2 alike
    static = sum(trace.get(k, 0) for k in ("param", "grad", "opt", "buffer"))
    slope, per_gpu = trace.get("per_image", (trace["total"] - static) / micro), cfg.batch_size // world_size
    at_zero = peak - slope * micro
    best = max((m for m in range(1, per_gpu + 1) if per_gpu % m == 0 and at_zero + slope * m <= 0.9 * gpu_gb * 1e9),
               default=0)
    return peak, best, at_zero, slope


# ---------------------------------------------------------------------------------------------------------------
# The run at a glance: phases, images, GPU-hours
# ---------------------------------------------------------------------------------------------------------------
def phases(cfg):
    """(name, first, end, global crop px) of each phase of the schedule (train.build_schedules)."""
    H = min(cfg.highres_iters, cfg.total_iters)
    W = min(cfg.warmup_iters, cfg.total_iters - H)
    out = [("warmup", 0, W, cfg.global_crop_size), ("cosine", W, cfg.total_iters - H, cfg.global_crop_size),
           ("high-res", cfg.total_iters - H, cfg.total_iters, cfg.highres_global_crop_size)]
    return [p for p in out if p[2] > p[1]]


def glance(cfg, flops_at, world_size, gpu, mfu, log):
    """Each phase with its steps, crops, lr and momentum at start and end, images seen; GPU-hours at `mfu` of the
    GPU's dense bf16 peak. flops_at: {global crop px: FLOPs per image of a step}."""
    scale = (cfg.batch_size / 1024) ** 0.5
    s = T.build_schedules(cfg, cfg.base_lr * scale, cfg.highres_base_lr * scale)
    peak, hours = PEAK_BF16_TFLOPS[gpu] * 1e12, 0.0
    log(f"  the run at a glance ({cfg.total_iters:,} steps of {cfg.batch_size:,} images; GPU-hours at "
        f"{mfu:.0%} MFU of an {gpu}, {PEAK_BF16_TFLOPS[gpu]} TFLOP/s dense bf16):")
    for name, a, b, size in phases(cfg):
        images = (b - a) * cfg.batch_size
        h = images * flops_at[size] / (mfu * peak) / 3600
        hours += h
        log(f"    {name:8s} steps {a:>7,}-{b:<7,} crops {size}/{cfg.local_crop_size} px  lr {s['lr'][a]:.2e}->"
            f"{s['lr'][b - 1]:.2e}  momentum {s['momentum'][a]:.4f}->{s['momentum'][b - 1]:.4f}  "
            f"{images / 1e6:8.1f}M images  {h:9,.0f} GPU-h")
    log(f"    total {cfg.total_iters * cfg.batch_size / 1e6:,.1f}M images, {hours:,.0f} GPU-hours "
        f"({hours / world_size:,.1f} h on {world_size} GPU(s))")
    return hours


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------
def plan(cfg, world_size, gpu_gb, kind=pretraining, gpu="H100", mfu=0.4, log=print, run=map):
    """Plan the configured step (each crop size of the schedule) and the run -> dict(micro_batch, accumulation,
    peak_gb, fits, best_micro_batch, tflops_per_image, gpu_hours, seconds). run: see at_full_depth."""
    t0 = time.perf_counter()
    micro, accum = layout(cfg, world_size)
    sizes = sorted({size for *_, size in phases(cfg)}) or [cfg.global_crop_size]
    size = max(sizes)  # every activation grows with the crop: the phase of the largest crops needs most memory
    traces = {s: extrapolated(cfg, micro, kind, global_crop_size=s, run=run) for s in sizes}
    fits = {s: fit(cfg, traces[s], world_size, gpu_gb) for s in sizes}
    peak, best, at_zero, slope = fits[size]
    what = getattr(cfg, "students", "") or cfg.arch
    precision = "bf16" if cfg.precision == "auto" else cfg.precision  # auto on a GPU
    log(f"plan: {what}, {world_size} GPU(s), {'FSDP2' if cfg.fsdp else 'DDP'}, {precision}, micro-batch "
        f"{micro} x accumulation {accum} = global batch {cfg.batch_size}; peak at {size} px crops")
    parts = {k: traces[size][k] / GiB for k in KINDS if traces[size].get(k)}
    log("  one-process step at the peak (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    log(f"  per-GPU peak {peak / GiB:.2f} GiB -> {'fits' if peak <= 0.9 * gpu_gb * 1e9 else 'does NOT fit'} "
        f"{gpu_gb:.0f} GB (90% budget) (~ {at_zero / GiB:.2f} + {slope / GiB:.3f} GiB per image); largest "
        f"micro-batch that fits: " + ", ".join(f"{fits[s][1]} at {s} px" for s in reversed(sizes)))
    flops_at = {s: traces[s]["flops"] / micro for s in sizes}
    log("  compute: " + ", ".join(f"{flops_at[s] / 1e12:.3f} TFLOP per image at {s} px" for s in sizes) +
        " (student fwd+bwd, teacher fwd)")
    hours = glance(cfg, flops_at, world_size, gpu, mfu, log)
    seconds = time.perf_counter() - t0
    log(f"  planned in {seconds:.0f} s")
    return dict(micro_batch=micro, accumulation=accum, peak_gb=peak / GiB, fits=peak <= 0.9 * gpu_gb * 1e9,
                best_micro_batch=best, best_at={s: f[1] for s, f in fits.items()},
                tflops_per_image=flops_at[cfg.global_crop_size] / 1e12, gpu_hours=hours, seconds=seconds)


PLAN_FLAGS = [("world_size", "GPUs of the run (default: $WORLD_SIZE or 1)", dict(type=int, default=0)),
              ("gpu_memory_gb", "GPU memory to fit, GB", dict(type=float, default=80.0)),
              ("gpu", "GPU for the GPU-hours (its dense bf16 peak)", dict(default="H100",
                                                                        choices=list(PEAK_BF16_TFLOPS))),
              ("mfu", "model FLOP utilisation assumed for the GPU-hours", dict(type=float, default=0.4))]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train", "distill"):
        cli.error("the first argument is what to plan: train or distill (then train.py's / distill.py's "
                  "flags, and --world_size, --gpu_memory_gb, --gpu, --mfu)", prog="plan.py")
    which, rest = argv[0], argv[1:]
    config, presets, kind = ((T.Config, T.PRESETS, pretraining) if which == "train"
                             else (DI.DistillConfig, DI.DISTILL_PRESETS, distillation))
    cfg, args = cli.parse_config(config, rest, presets=presets, default_preset="tiny", extra_flags=PLAN_FLAGS,
                                 prog=f"plan.py {which}", description=__doc__.split("\n\n")[0])
    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    spawn = multiprocessing.get_context("spawn")  # the traces are independent: a process per core, up to 4
    try:
        with ProcessPoolExecutor(min(os.cpu_count() or 1, 4), mp_context=spawn) as pool:
            plan(cfg, world_size, args.gpu_memory_gb, kind, args.gpu, args.mfu, run=pool.map)
    except ValueError as e:  # a refused layout: one line, as a bad flag
        cli.error(str(e), prog=f"plan.py {which}")


if __name__ == "__main__":
    main()
