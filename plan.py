"""GPU memory and compute plan of a DINOv2 training step, without a GPU, and the training-step benchmark.

A training run on GPUs fails late and expensively when one step does not fit. `python train.py --plan` traces
one real optimizer step (train.train_step: teacher targets, student forward/backward, AdamW, EMA) on fake
tensors (torch FakeTensorMode: shapes and dtypes, no data; 2-3 minutes for ViT-S on 2 CPU cores) and reports,
per GPU, the peak memory of parameters, gradients, AdamW state, activations and temporaries (MemTracker), and
the FLOPs per image (FlopCounterMode). Given a GPU size it picks the largest micro-batch that fits and the gradient
accumulation that reaches the global batch. The trace runs the product's own step; nothing is modelled twice.

Run:
    python train.py --plan --preset vit_s --micro_batch_size 128       # one GPU (WORLD_SIZE unset: 1)
    WORLD_SIZE=8 python train.py --plan --preset vit_l                 # per GPU of an 8-GPU run
    WORLD_SIZE=96 python train.py --plan --preset vit_g --fsdp --activation_checkpointing --gpu_memory_gb 80
    WORLD_SIZE=8 python distill.py --plan --preset paper --students vit_small,vit_base,vit_large
    python train.py --bench                               # measured CPU images/s and memory beside the plan
The README lists the plans of its GPU commands, with the commands above.

Sec. 5 (efficient implementation) -> code: FSDP sharding of parameters, gradients and AdamW state (divided by
the world size here), mixed precision (the trace runs under the config's autocast), activation checkpointing.
"""
import contextlib
import dataclasses
import time

import numpy as np
import torch

import train as T
from data import MultiCropCollate
from runtime import reset_peak_memory

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Tracing one step on fake tensors
# ---------------------------------------------------------------------------------------------------------------
def real_batch(cfg, micro_batch):
    """A micro-batch from the real collate on random images (the mask counts are real, so M is exact)."""
    size = cfg.global_crop_size
    collate = MultiCropCollate(size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size,
                               mask_ratio=cfg.mask_ratio, mask_probability=cfg.mask_probability,
                               seed=cfg.seed, global_batch=micro_batch)
    g = torch.Generator().manual_seed(0)
    images = [(torch.rand(3, size, size, generator=g), 0, (0, j)) for j in range(micro_batch)]
    return collate(images)


def build_pretraining(cfg):
    """train.train()'s networks: one learner (the student) whose EMA is the teacher -> ([(name, student,
    ema)], teacher)."""
    student, teacher, _ = T.build_student_teacher(cfg)
    return [("student", student, teacher)], teacher


def fake_learners(cfg, mode, build):
    """(learners, teacher) as train() / distill() build them on one process, with fake parameters: built on the
    meta device (weight initialisation reads values, which fake tensors do not have), then materialised empty."""
    with torch.device("meta"):
        nets, teacher = build(cfg)
    with mode:
        cfg = dataclasses.replace(cfg, compile=False)
        learners = [T.build_learner(name, model.to_empty(device=CPU), ema.to_empty(device=CPU), cfg, CPU,
                                    distributed=False) for name, model, ema in nets]
        teacher = teacher if any(teacher is ema for _, _, ema in nets) else teacher.to_empty(device=CPU)
        return learners, teacher


def hyperparameters(cfg):
    return dict(lr=1e-4, last_layer_lr=1e-4, wd=cfg.weight_decay, momentum=cfg.momentum_teacher,
                teacher_temp=cfg.teacher_temp)


def trace_step(cfg, micro_batch, memory=True, prepare=None, build=build_pretraining):
    """Run train.train_step on fake tensors and count its FLOPs; with memory, run it twice and measure the
    second (AdamW's state exists then, as in every later step). prepare(cfg, batch) -> batch adapts the batch
    (distillation: no masks). -> dict(flops_per_micro_batch and, with memory, MemTracker's bytes at the peak by
    kind: "_memreftype.param", ".buffer", ".grad", ".act", ".temp", ".opt", ".oth", and "total")."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode
    if cfg.attn_impl == "auto":  # on a GPU "auto" is the fused kernel; on the fake CPU trace it could differ
        cfg = dataclasses.replace(cfg, attn_impl="fused")
    batch = real_batch(cfg, micro_batch)
    batch = prepare(cfg, batch) if prepare else batch
    autocast = T.autocast_for(cfg, CPU)
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the meta parameters are materialised inside
    learners, teacher = fake_learners(cfg, mode, build)
    with mode:
        fake = {k: (mode.from_tensor(v) if v is not None else None) for k, v in batch.items()}
        centers = T.zero_centers(teacher.dino_head.last_layer.weight_v.shape[0], CPU)
        if memory:  # a first step creates AdamW's state: the measured second step holds it, as every later one
            T.train_step(learners, teacher, [fake], hyperparameters(cfg), centers, cfg, autocast)
        tracker, flops = MemTracker(), FlopCounterMode(display=False)
        if memory:  # MemTracker hooks every parameter of a module it sees run; the teacher's run under no_grad
            teacher.requires_grad_(True)
            for learner in learners:
                tracker.track_external(learner.model, learner.ema, learner.optimizer)
            tracker.track_external(teacher)
        with (tracker if memory else contextlib.nullcontext()), flops:
            T.train_step(learners, teacher, [fake], hyperparameters(cfg), centers, cfg, autocast)
    out = dict(flops_per_micro_batch=flops.get_total_flops())
    if memory:
        snapshot = tracker.get_tracker_snapshot("peak")
        by_kind = next(iter(snapshot.values()))  # one device: {"Parameter": bytes, ..., "Total": bytes}
        out.update({str(k).lower(): v for k, v in by_kind.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-GPU memory: the traced step (one process) adjusted for DDP buckets or FSDP2 shards
# ---------------------------------------------------------------------------------------------------------------
GiB = 2 ** 30


def per_gpu_memory(cfg, trace, world_size, build=build_pretraining):
    """Peak bytes on one GPU from a one-process trace. DDP keeps a full copy of everything plus gradient buckets
    as large as the gradients; FSDP2 divides parameters, gradients and AdamW state by the world size and
    gathers about two blocks' parameters at a time (the one computing and the one prefetched)."""
    with torch.device("meta"):
        nets, _ = build(cfg)
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())
    student_bytes = sum(size(model) for _, model, _ in nets)
    block_bytes = max(size(model.backbone.blocks[0]) for _, model, _ in nets)
    static = trace["_memreftype.param"] + trace["_memreftype.grad"] + trace["_memreftype.opt"]
    dynamic = trace["total"] - static
    if cfg.fsdp and world_size > 1:
        return static / world_size + dynamic + 2 * block_bytes
    return trace["total"] + (student_bytes if world_size > 1 else 0)


def plan(cfg, world_size, gpu_gb, prepare=None, build=build_pretraining, log=print):
    """Trace the configured step, report its per-GPU memory and FLOPs, and the largest micro-batch that fits a
    GPU of gpu_gb (peak at most 90% of it: the CUDA context and allocator slack take the rest).
    -> dict(micro_batch, accumulation, peak_gb, fits, best_micro_batch, tflops_per_image)."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    t0 = time.perf_counter()
    trace = trace_step(cfg, micro, prepare=prepare, build=build)  # the second of two steps (AdamW state exists)
    peak = per_gpu_memory(cfg, trace, world_size, build)
    static_bytes = sum(trace[f"_memreftype.{k}"] for k in ("param", "grad", "opt", "buffer"))
    static = per_gpu_memory(cfg, dict(trace, total=static_bytes), world_size, build)
    slope, base = (peak - static) / micro, static  # activations and temporaries grow with the micro-batch
    budget = 0.9 * gpu_gb * 1e9
    candidates = [m for m in range(1, cfg.batch_size // world_size + 1)
                  if (cfg.batch_size // world_size) % m == 0 and base + slope * m <= budget]
    best = max(candidates, default=0)
    result = dict(micro_batch=micro, accumulation=cfg.batch_size // (micro * world_size), peak_gb=peak / GiB,
                  fits=peak <= budget, best_micro_batch=best,
                  tflops_per_image=trace["flops_per_micro_batch"] / micro / 1e12)
    parts = {k.removeprefix("_memreftype."): v / GiB for k, v in trace.items() if k.startswith("_memreftype")}
    what = getattr(cfg, "students", "") or cfg.arch
    log(f"plan: {what}, {world_size} GPU(s), {'FSDP2' if cfg.fsdp else 'DDP'}, {cfg.precision}, "
        f"micro-batch {micro} x accumulation {result['accumulation']} = global batch {cfg.batch_size}")
    log("  one-process trace at the peak (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v))
    log(f"  per-GPU peak {peak / GiB:.2f} GiB -> {'fits' if result['fits'] else 'does NOT fit'} "
        f"{gpu_gb:.0f} GB (90% budget); largest micro-batch that fits: {best} "
        f"(peak ~ {base / GiB:.2f} + {slope / GiB:.3f} GiB per image)")
    log(f"  compute: {result['tflops_per_image']:.3f} TFLOP per image per step (student fwd+bwd, teacher fwd); "
        f"traced in {time.perf_counter() - t0:.0f} s")
    return result


# ---------------------------------------------------------------------------------------------------------------
# The benchmark: measured images/s and memory of train.train_step on this machine, beside the plan
# ---------------------------------------------------------------------------------------------------------------
def rss_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def run_steps(cfg, micro_batch, steps, device):
    """Build the learner as train() does and run train.train_step `steps` times on one fixed real batch
    -> wall and CPU seconds of each step."""
    torch.manual_seed(0)
    student, teacher, _ = T.build_student_teacher(cfg)
    learner = T.build_learner("student", student, teacher, cfg, device)
    batch = T.batch_to(real_batch(cfg, micro_batch), device)
    centers, autocast = T.zero_centers(cfg.n_prototypes, device), T.autocast_for(cfg, device)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        T.train_step([learner], teacher, [batch], hyperparameters(cfg), centers, cfg, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def measure(cfg, micro_batch, steps, device):
    """Median wall / CPU seconds of `steps` steps after a warm-up step, and the peak memory above what the
    process held before the model existed: CUDA's max_memory_allocated, or on a CPU the peak resident size
    above the start, measured after a throw-away run at micro-batch 2 has loaded torch's kernels and thread
    pools and malloc_trim has handed its memory back (so the figure is the step's, not the libraries')."""
    if device.type == "cpu":
        import ctypes
        import gc
        run_steps(cfg, 2, 2, device)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory(device)
    before = rss_bytes("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated(device)
    wall, cpu = run_steps(cfg, micro_batch, steps + 1, device)  # the first step warms up (AdamW state)
    peak = rss_bytes("VmHWM") if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    return float(np.median(wall[1:])), float(np.median(cpu[1:])), peak - before


def _measure_in_child(cfg, micro_batch, steps, queue):
    torch.set_num_threads(torch.get_num_threads())
    queue.put(measure(cfg, micro_batch, steps, CPU))


def fast_bf16(device):
    """bf16 matmuls run natively on GPUs and on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated, ~40x
    slower than fp32 (measured on an AMD EPYC with AVX2), and the benchmark skips them."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bench(device, steps=5, runs=None):
    """Images/s and peak memory of one training step, measured and planned: the tiny preset (its batch, 28 px)
    and ViT-S/14 (batch 8, paper crops 2 x 224 + 8 x 98), fp32 and (where it is native) bf16. On CPU each configuration runs in a
    fresh process, so its peak resident memory above the start is its own. -> list of result dicts."""
    import multiprocessing as mp
    runs = runs or (("tiny", "tiny", T.PRESETS["tiny"]["batch_size"]), ("ViT-S/14", "vit_s", 8))
    results = []
    for name, preset, batch in runs:
        for precision in ("fp32", "bf16") if fast_bf16(device) else ("fp32",):
            cfg = T.Config(**{**T.PRESETS[preset], "batch_size": batch, "micro_batch_size": 0,
                              "precision": precision, "total_iters": 100, "warmup_iters": 10})
            if device.type == "cpu":  # what "auto" picks on a CPU (model.resolve_attn_impl): traced alike
                cfg = dataclasses.replace(cfg, attn_impl="fused" if precision == "fp32" else "explicit")
                queue = mp.get_context("spawn").Queue()
                child = mp.get_context("spawn").Process(target=_measure_in_child, args=(cfg, batch, steps, queue))
                child.start()
                child.join()  # the result is small: the queue does not block the child's exit
                if child.exitcode != 0:
                    raise RuntimeError(f"benchmark process for {name} {precision} failed ({child.exitcode})")
                wall, cpu, peak = queue.get()
            else:
                wall, cpu, peak = measure(cfg, batch, steps, device)
            planned = per_gpu_memory(cfg, trace_step(cfg, batch), 1)
            results.append(dict(name=name, batch=batch, precision=precision, images_per_s=batch / wall,
                                peak_gb=peak / GiB, plan_gb=planned / GiB))
            print(f"{name:9s} batch {batch:4d} {precision}: {batch / wall:7.1f} images/s ({wall:.3f} s/step "
                  f"wall, {cpu:.3f} s CPU), peak memory {peak / GiB:.2f} GB measured, {planned / GiB:.2f} GB "
                  f"planned ({planned / peak - 1:+.0%})", flush=True)
    return results


def main(cfg, args):
    """train.py / distill.py --plan and --bench."""
    import os
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    if args.bench:
        return bench(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if not getattr(args, "world_size", 0) else args.world_size
    gpu_gb = args.gpu_memory_gb or (torch.cuda.get_device_properties(0).total_memory / 1e9
                                    if torch.cuda.is_available() else 80)
    return plan(cfg, world_size, gpu_gb)


def main_distill(cfg, args):
    """distill.py --plan: the students and a frozen teacher (its checkpoint's architecture when the file exists,
    else the paper's ViT-g/14 with its official heads) on batches without masks (Sec. 5)."""
    import os
    import distill
    from_file = os.path.exists(cfg.teacher)
    if not from_file:
        print(f"plan: no teacher checkpoint at {cfg.teacher!r}: planning for the paper's ViT-g/14 teacher")

    def build(c):
        if not from_file:
            tcfg = T.Config(arch="vit_giant2", patch_size=c.patch_size, global_crop_size=c.global_crop_size)
            _, teacher, _ = T.build_student_teacher(tcfg)
        else:
            teacher = distill.load_teacher(cfg.teacher)[0]
        K = teacher.dino_head.last_layer.weight_v.shape[0]
        nets = []
        for name in c.students.split(","):
            student, ema, _ = T.build_student_teacher(distill.student_config(c, name, K))
            nets.append((name, student, ema))
        return nets, teacher.requires_grad_(False)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    gpu_gb = args.gpu_memory_gb or 80
    return plan(cfg, world_size, gpu_gb, prepare=distill.prepare_batch, build=build)
