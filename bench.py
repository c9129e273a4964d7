"""Benchmarks of the training side: commands that print numbers (the README quotes them beside the command).

    python bench.py step        a training step (train.train_step) of the tiny preset and of ViT-S/14 at batch 8:
                                images/s, FLOP/s and its ratio to a matmul measured in the same run (the CPU's
                                MFU), and the peak memory beside the plan (plan.py); fp32, and bf16 where native
    python bench.py profile     where a tiny step's time goes: attention, MLP, heads and prototypes, losses and
                                Sinkhorn-Knopp, optimizer and EMA, augmentation
    python bench.py attention   ViT-S/14 + 4 registers at 224 and 518 px: fused vs explicit attention, fp32 vs
                                bf16 (what model.resolve_attn_impl's "auto" picks on a CPU)
    python bench.py sampler     data.GlobalBatchSampler at LVD-142M's size: time and host memory per step
    torchrun --nproc_per_node=2 bench.py resume
                                host memory per rank while a ViT-L-sized checkpoint is resumed under FSDP2, the
                                file memory-mapped (as train.py does) vs read whole
Run with nothing else on the machine. OMP_WAIT_POLICY=PASSIVE avoids the worst stalls of a shared one but
slows the tiny step ~1.5x against libgomp's default, which `python train.py` runs with (docs/benchmarks.md).
"""
import ctypes
import dataclasses
import gc
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

import cli
import plan
import train as T
from augment import MultiCropCollate
from data import GlobalBatchSampler
from model import Attention, DINOHead, Mlp, SwiGLUFFN, vit_small
from runtime import (DTYPES, autocast, keep_freed_host_memory, native_bf16, print0, reset_peak_memory,
                     setup_distributed, teardown_distributed, wrap)

CPU = torch.device("cpu")
GiB = 2 ** 30
COMMANDS = ("step", "profile", "attention", "sampler", "resume")


@dataclass
class BenchConfig:
    # --- all benchmarks
    repeats: int = 5  # timed repeats after a warm-up (medians are printed)
    threads: int = 0  # torch threads; 0 = torch's default
    # --- step and profile
    compile: bool = False  # torch.compile the student (train.py --compile)
    keep_freed_memory: bool = True  # runtime.keep_freed_host_memory, as train.py applies it on a CPU
    n_local_crops: int = -1  # local crops per image; -1: the preset's
    models: str = "tiny,vit_s"  # step: the presets to time (tiny at batch 64, vit_s at batch 8)
    # --- attention
    batch_224: int = 8  # images per call at 224 px (261 tokens with 4 registers)
    batch_518: int = 1  # images per call at 518 px (1,374 tokens)
    # --- sampler (LVD-142M on 256 GPUs, the vit_g preset's batches)
    images: int = 142_000_000  # dataset size
    global_batch: int = 3072  # images per step
    micro_batch: int = 12  # images per GPU per forward pass
    world_size: int = 256  # GPUs
    # --- resume
    preset: str = "vit_l"  # train.py preset whose checkpoint is resumed

    def __post_init__(self):
        for name in ("repeats", "batch_224", "batch_518", "images", "global_batch", "micro_batch", "world_size"):
            cli.at_least(name, getattr(self, name), 1)
        cli.at_least("threads", self.threads, 0)
        cli.at_least("n_local_crops", self.n_local_crops, -1)
        cli.one_of("preset", self.preset, list(T.PRESETS))
        for name in self.models.split(","):
            cli.one_of("models", name, list(STEP_RUNS))


def rss(field):
    """A field of /proc/self/status in bytes (VmRSS, VmHWM: peak resident, RssAnon: private, RssFile)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) * 1024


def release_memory():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def median_seconds(fn, repeats):
    """Median wall-clock seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(dtype, n=1024, repeats=10):
    """FLOP/s of an n x n by n x n matmul in dtype on this machine: the rate the step's matmuls can reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: a @ b, repeats)


# ---------------------------------------------------------------------------------------------------------------
# A training step: speed, FLOP/s against the matmul rate, memory against the plan
# ---------------------------------------------------------------------------------------------------------------
def step_config(preset, batch, precision, compile_=False, n_local_crops=-1):
    local = {"n_local_crops": n_local_crops} if n_local_crops >= 0 else {}
    cfg = T.Config(**{**T.PRESETS[preset], "batch_size": batch, "micro_batch_size": 0, "precision": precision,
                      "total_iters": 100, "warmup_iters": 10, "compile": compile_, **local})
    return dataclasses.replace(cfg, koleo_group_size=min(cfg.koleo_group_size, batch))


def run_steps(cfg, batch_size, steps, device=CPU):
    """Build the student as train() does and run train.train_step `steps` times on one fixed real batch
    -> wall seconds of each step."""
    torch.manual_seed(0)
    model, teacher, _ = T.build_student_teacher(cfg)
    student = T.build_student(model, teacher, cfg, device)
    batch = {k: v.to(device) for k, v in plan.real_batch(cfg, batch_size).items()}
    centers, dtype = T.zero_centers(cfg.n_prototypes, device), DTYPES[cfg.precision]
    hp = dict(lr=1e-4, last_layer_lr=1e-4, wd=0.04, momentum=0.99, teacher_temp=cfg.teacher_temp)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        T.train_step(student, teacher, [batch], hp, centers, cfg, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure_step(cfg, batch, repeats, keep_freed_memory, queue):
    """In a fresh process -> (median seconds of a step after 2 warm-up steps, the peak resident memory above
    what the process held after a throw-away run at batch 2 (uncompiled) had loaded torch's kernels and thread
    pools, so the figure is the step's, not the libraries'; seconds of the 2 warm-up steps: AdamW's state and
    any compilation)."""
    if keep_freed_memory:
        keep_freed_host_memory()
    run_steps(dataclasses.replace(cfg, compile=False), 2, 2)
    release_memory()
    reset_peak_memory(CPU)
    before = rss("VmRSS")
    times = run_steps(cfg, batch, repeats + 2)
    queue.put((statistics.median(times[2:]), rss("VmHWM") - before, sum(times[:2])))


def in_child(fn, *args):
    """fn(*args, queue) in a fresh spawned process -> what it put on the queue (its memory is its own)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=fn, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


STEP_RUNS = {"tiny": ("tiny", 64), "vit_s": ("ViT-S/14", 8)}  # preset -> (name, batch)


def bench_step(bcfg):
    """-> list of result dicts, one per (model, precision), printed as they come."""
    precisions = ("fp32", "bf16") if native_bf16(CPU) else ("fp32",)
    rates = {p: matmul_flops(DTYPES[p]) for p in precisions}
    print("matmul 1024^3 on this CPU: " + ", ".join(f"{p} {r / 1e9:.0f} GFLOP/s" for p, r in rates.items()))
    results = []
    for preset in bcfg.models.split(","):
        name, batch = STEP_RUNS[preset]
        for precision in precisions:
            cfg = step_config(preset, batch, precision, bcfg.compile, bcfg.n_local_crops)
            seconds, peak, warmup = in_child(measure_step, cfg, batch, bcfg.repeats, bcfg.keep_freed_memory)
            flops = plan.trace_step(cfg, batch, memory=False)["flops"]
            planned = plan.per_gpu_memory(cfg, plan.trace_step(cfg, batch), 1)
            r = dict(name=name, batch=batch, precision=precision, seconds=seconds, images_per_s=batch / seconds,
                     warmup_s=warmup,
                     gflops=flops / seconds / 1e9, mfu=flops / seconds / rates[precision], peak_gb=peak / GiB,
                     plan_gb=planned / GiB)
            results.append(r)
            print(f"{name:9s} batch {batch:3d} {precision}: {r['images_per_s']:7.1f} images/s ({seconds:.3f} s/step), "
                  f"{flops / 1e9:.1f} GFLOP/step -> {r['gflops']:.0f} GFLOP/s = {r['mfu']:.0%} of the matmul rate; "
                  f"peak memory {r['peak_gb']:.2f} GB measured, {r['plan_gb']:.2f} GB planned "
                  f"({planned / peak - 1:+.0%}); first two steps {warmup:.1f} s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Where a step's time goes
# ---------------------------------------------------------------------------------------------------------------
class PartTimer:
    """Wall-clock seconds by part of the step. Parts nest (a stack): a part's time excludes the parts it calls.
    On a CPU every op runs synchronously, so the time between two hooks is the work in between."""

    def __init__(self):
        self.seconds, self.stack, self.t = defaultdict(float), [], time.perf_counter()

    def enter(self, part):
        self._charge()
        self.stack.append(part)

    def leave(self, *_):
        self._charge()
        self.stack.pop()

    def _charge(self):
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.t
        self.t = now

    def wrap(self, fn, part):
        def timed(*args, **kwargs):
            self.enter(part)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return timed

    def watch(self, module, part):
        """Forward and backward of `module` (backward: from its output gradients to its input gradients)."""
        module.register_forward_pre_hook(lambda *_: self.enter(part))
        module.register_forward_hook(lambda *_: self.leave())
        module.register_full_backward_pre_hook(lambda *_: self.enter(part))
        module.register_full_backward_hook(lambda *_: self.leave())


MODULE_PARTS = ((Attention, "attention"), ((Mlp, SwiGLUFFN), "MLP"), (DINOHead, "heads and prototypes"))
FUNCTION_PARTS = (("sinkhorn_knopp_bias", "losses and Sinkhorn-Knopp"), ("dino_loss", "losses and Sinkhorn-Knopp"),
                  ("koleo_loss", "losses and Sinkhorn-Knopp"), ("ibot_loss_in_chunks", "heads and prototypes"),
                  ("optimizer_step", "optimizer and EMA"), ("ema_update", "optimizer and EMA"))


def profile_step(cfg, batch_size, repeats, keep_freed_memory, queue):
    """In a fresh process: seconds by part over `repeats` steps of train.train_step, and of the collate that
    augments one batch (it runs in a DataLoader worker, beside the step)."""
    if keep_freed_memory:
        keep_freed_host_memory()
    timer = PartTimer()
    for name, part in FUNCTION_PARTS:  # the step calls them by these names in train.py
        setattr(T, name, timer.wrap(getattr(T, name), part))
    torch.manual_seed(0)
    model, teacher, _ = T.build_student_teacher(cfg)
    for module in [*model.modules(), *teacher.modules()]:
        part = next((p for kind, p in MODULE_PARTS if isinstance(module, kind)), None)
        if part:
            timer.watch(module, part)
    student = T.build_student(model, teacher, cfg, CPU)
    batch = plan.real_batch(cfg, batch_size)
    hp = dict(lr=1e-4, last_layer_lr=1e-4, wd=0.04, momentum=0.99, teacher_temp=cfg.teacher_temp)
    centers, dtype = T.zero_centers(cfg.n_prototypes, CPU), DTYPES[cfg.precision]
    step = lambda: T.train_step(student, teacher, [batch], hp, centers, cfg, dtype)
    step()
    timer.seconds.clear()
    t0 = time.perf_counter()
    for _ in range(repeats):
        timer.enter("other (norms, embeddings, residuals, autograd)")
        step()
        timer.leave()
    total = (time.perf_counter() - t0) / repeats
    collate = MultiCropCollate(cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops, cfg.patch_size,
                               seed=0, global_batch=batch_size)
    items = [(torch.rand(3, 28, 28), 0, (0, j)) for j in range(batch_size)]
    augmentation = median_seconds(lambda: collate(items), repeats)
    queue.put((total, {k: v / repeats for k, v in timer.seconds.items()}, augmentation))


def bench_profile(bcfg):
    precision = "bf16" if native_bf16(CPU) else "fp32"
    cfg = step_config("tiny", 64, precision, bcfg.compile, bcfg.n_local_crops)
    total, parts, augmentation = in_child(profile_step, cfg, 64, bcfg.repeats, bcfg.keep_freed_memory)
    print(f"tiny step, batch 64, {precision}: {total * 1e3:.0f} ms (median of {bcfg.repeats} after a warm-up); "
          f"forward and backward of each part")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:48s} {seconds * 1e3:7.1f} ms  {seconds / total:5.1%}")
    print(f"  {'augmentation (one batch, in a DataLoader worker)':48s} {augmentation * 1e3:7.1f} ms")
    return total, parts, augmentation


# ---------------------------------------------------------------------------------------------------------------
# Attention paths, the data order at 142M images, resuming a large checkpoint
# ---------------------------------------------------------------------------------------------------------------
def bench_attention(bcfg):
    """Forward (no grad) and forward+backward seconds of ViT-S/14 + 4 registers (the hub reg4 model)."""
    model = vit_small(num_register_tokens=4, img_size=518, init_values=1.0, interpolate_antialias=True,
                      interpolate_offset=0.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {bcfg.repeats}, seconds")
    print(f"{'size':>4} {'batch':>5} {'tokens':>6} {'dtype':>5} {'attn':>8} {'fwd':>7} {'fwd+bwd':>8}")
    dtypes = ("fp32", "bf16") if native_bf16(CPU) else ("fp32",)
    for size, batch in ((224, bcfg.batch_224), (518, bcfg.batch_518)):
        x = torch.randn(batch, 3, size, size)
        for precision, impl in ((p, i) for p in dtypes for i in ("fused", "explicit")):
            model.set_attn_impl(impl)

            def forward():
                with torch.no_grad(), autocast(DTYPES[precision], CPU):
                    model.forward_features(x)

            def forward_backward():
                model.zero_grad(set_to_none=True)
                with autocast(DTYPES[precision], CPU):
                    loss = model.forward_features(x)["x_prenorm"].float().mean()
                loss.backward()
            f, fb = median_seconds(forward, bcfg.repeats), median_seconds(forward_backward, bcfg.repeats)
            print(f"{size:>4} {batch:>5} {1 + 4 + (size // 14) ** 2:>6} {precision:>5} {impl:>8} {f:>7.2f} {fb:>8.2f}",
                  flush=True)


def bench_sampler(bcfg):
    """Seconds and host memory to produce one rank's micro-batches of a step at LVD-142M's size, beside the
    one permutation of the whole dataset per step that a shuffled epoch would need."""
    release_memory()
    reset_peak_memory(CPU)
    before = rss("VmRSS")
    sampler = GlobalBatchSampler(bcfg.images, bcfg.global_batch, bcfg.micro_batch, seed=0,
                                 rank=bcfg.world_size - 1, world_size=bcfg.world_size)
    steps = iter([0, 1, sampler.steps_per_epoch - 1, sampler.steps_per_epoch, 10 ** 6] * bcfg.repeats)
    seconds = median_seconds(lambda: sampler.micro_batches(next(steps)), 5 * bcfg.repeats - 1)
    added = rss("VmHWM") - before
    print(f"GlobalBatchSampler, {bcfg.images:,} images, global batch {bcfg.global_batch}, micro-batch "
          f"{bcfg.micro_batch} on rank {bcfg.world_size - 1} of {bcfg.world_size}: {seconds * 1e3:.3f} ms per step, "
          f"{added / 2 ** 20:.1f} MiB of host memory")
    release_memory()
    reset_peak_memory(CPU)
    before = rss("VmRSS")
    t0 = time.perf_counter()
    np.random.default_rng([0, 0]).permutation(bcfg.images)
    print(f"for scale, one permutation of the {bcfg.images:,} indices: {time.perf_counter() - t0:.2f} s, "
          f"{(rss('VmHWM') - before) / GiB:.2f} GiB")
    return seconds, added


def bench_resume(bcfg):
    """Under torchrun (gloo on CPU): the preset's student, teacher and AdamW state sharded by FSDP2 (built on the
    meta device, so no rank holds a whole model), saved once as train.py does, then resumed with the file
    memory-mapped (train.py's way) and read whole; prints each rank's added private memory and peak."""
    rank, world, _ = setup_distributed()
    cfg = dataclasses.replace(T.Config(**T.PRESETS[bcfg.preset]), fsdp=True, precision="fp32",
                              micro_batch_size=0, batch_size=world)
    with torch.device("meta"):
        model, teacher, model_args = T.build_student_teacher(cfg)
    wrapped = wrap(model, teacher, cfg, CPU)  # sharded while still on the meta device
    for m in (model, teacher):
        m.to_empty(device=CPU)  # each rank allocates its shards only
    optimizer = torch.optim.AdamW(T.param_groups(model, cfg), lr=0.0)
    student = T.Student(model, wrapped, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    for p in model.parameters():  # AdamW state of every parameter, as after a step
        p.grad = torch.zeros_like(p)
    student.optimizer.step()
    folder = _shared_folder(tempfile.mkdtemp(prefix="bench_resume_", dir=".") if rank == 0 else None)
    path = os.path.join(folder, "checkpoint.pth")
    T.save_checkpoint(path, cfg, model_args, 1, student, teacher, T.zero_centers(cfg.n_prototypes, CPU))
    torch.distributed.barrier()
    size = os.path.getsize(path)
    for mmap in (True, False):
        release_memory()
        with PeakSampler() as private, PeakSampler("RssFile") as mapped:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            T.load_checkpoint(ckpt, student, teacher, cfg, CPU)
            del ckpt
            release_memory()
        line = torch.tensor([private.peak, mapped.peak], dtype=torch.float64)
        lines = [torch.zeros_like(line) for _ in range(world)]
        torch.distributed.all_gather(lines, line)
        print0(f"{bcfg.preset} checkpoint {size / GiB:.2f} GiB on {world} ranks, {'memory-mapped' if mmap else 'read'}: "
               + "; ".join(f"rank {r}: private memory peak +{a / GiB:.2f} GiB, file pages mapped {f / GiB:.2f} GiB"
                           for r, (a, f) in enumerate(lines)))
    torch.distributed.barrier()
    if rank == 0:
        os.remove(path)
        os.rmdir(folder)
    del student, wrapped, teacher
    teardown_distributed()


class PeakSampler:
    """The peak of a /proc/self/status field above its value at entry, sampled every 5 ms by a thread (RssAnon:
    this process's private memory; RssFile: file pages it maps, shared with every process that maps them)."""

    def __init__(self, field="RssAnon"):
        self.field, self.peak, self.running = field, 0, False

    def __enter__(self):
        import threading
        self.start, self.running = rss(self.field), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss(self.field) - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _shared_folder(folder):
    """Rank 0's temporary folder, told to every rank."""
    holder = [folder]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def main(argv=None):
    cfg, args = cli.parse_config(BenchConfig, sys.argv[1:] if argv is None else argv, prog="bench.py",
                                 positionals=[("command", "which benchmark", dict(choices=COMMANDS))],
                                 description=__doc__.split("\n\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dict(step=bench_step, profile=bench_profile, attention=bench_attention, sampler=bench_sampler,
         resume=bench_resume)[args.command](cfg)


if __name__ == "__main__":
    main()
