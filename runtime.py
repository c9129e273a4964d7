"""What a training run needs besides the method: processes, its directory, checkpoints, progress, preemption.

train.py and distill.py hold the method (Sec. 4-5); this file holds the machinery around it, the same for
both, so neither grows past a readable size and the loop reads as the method:
  - processes: torchrun (RANK in the environment) or one plain process, print0 on rank 0 ... setup_distributed
  - the run directory: never start over an existing run by accident, one writer at a time (a lock file; a
    dead writer's lock is taken over), --resume only a run that can continue as it was .... open_run_dir
  - checkpoints: unsharded, optimizer keyed by name, atomic, memory-mapped on resume .. full_state_dicts
  - precision: bf16 where the device computes it natively, else fp32 ......... resolve_precision
  - host memory on a CPU: what a step frees stays for the next step ...... keep_freed_host_memory
  - progress bar and metrics.jsonl with images/s, memory and model FLOP utilisation ........ Progress
  - SIGTERM / SIGUSR1 from a cluster scheduler: checkpoint at the end of the step, exit ..... StopSignal
Nothing runs on import; nothing here knows the model.
"""
import atexit
import contextlib
import ctypes
import gc
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cli
from losses import is_dist


# ---------------------------------------------------------------------------------------------------------------
# Processes: torchrun (RANK in the environment) or one plain process
# ---------------------------------------------------------------------------------------------------------------
def setup_distributed(timeout=None):
    """-> (rank, world_size, device). A process group only when launched by torchrun (or anything setting RANK);
    once made, later calls return the same. timeout: a datetime.timedelta for collectives (default: torch's)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not is_dist():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def teardown_distributed():
    """End the process group once every rank is here. The caller drops its DDP / FSDP2 modules first: they
    hold the group. The barrier keeps a fast rank from closing gloo's connections while a slow one still uses
    them (gloo then aborts with "terminate called without an active exception")."""
    if is_dist():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def print0(*args, **kwargs):
    """print on rank 0 only (the built-in print stays untouched on every rank)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The run's layout and precision, computed once; Sec. 5: DDP or FSDP2, activation checkpointing, compile
# ---------------------------------------------------------------------------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(dtype, device):
    """Mixed precision (Sec. 5, App. B): a fresh torch autocast context computing matmuls in dtype (fp32: off).
    Losses, softmaxes and Sinkhorn-Knopp run in fp32 whatever the dtype (losses.py)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def layout(cfg, world_size):
    """(micro-batch, accumulation steps) of the global batch on world_size processes; refuses a layout where the
    batch does not split evenly or a KoLeo group would straddle two forward passes (one line, as a flag error)."""
    micro = cfg.micro_batch_size or cfg.batch_size // world_size
    accum = cfg.batch_size // max(micro * world_size, 1)
    if micro < 1 or micro * world_size * accum != cfg.batch_size:
        raise ValueError(f"--batch_size: {cfg.batch_size} must be --micro_batch_size {micro} x world size "
                         f"{world_size} x a whole number of accumulation steps")
    group = cfg.koleo_group_size
    if (micro * world_size) % group:
        per_rank = cfg.batch_size // world_size
        works = [m for m in range(1, per_rank + 1) if per_rank % m == 0 and (m * world_size) % group == 0]
        raise ValueError(f"--koleo_group_size: a group of {group} images must lie inside one forward pass of all "
                         f"ranks, but {world_size} rank(s) x micro-batch {micro} = {micro * world_size} is not a "
                         f"multiple of it; micro-batch sizes that work here: {works or 'none'} (or set "
                         f"--koleo_group_size to a divisor of {micro * world_size})")
    return micro, accum


@dataclass
class Run:
    """Who this process is and what follows from the config, computed once (printed, never written back)."""
    rank: int
    world_size: int
    device: torch.device
    micro_batch_size: int
    accumulation_steps: int
    lr: float  # peak learning rate after the square-root scaling rule
    highres_lr: float  # peak learning rate of the high-resolution phase, same rule
    stop_at: int  # last iteration of this invocation (stop_after or total_iters)
    precision: str  # bf16 | fp16 | fp32 ("auto" resolved for this device)
    dtype: torch.dtype  # of the forward passes' matmuls


def start_run(cfg):
    """This process's rank, world size and device, and the values derived from the config, printed with it."""
    rank, world_size = get_rank(), dist.get_world_size() if is_dist() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    micro, accum = layout(cfg, world_size)
    precision, why = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_host_memory()
    scale = math.sqrt(cfg.batch_size / 1024)  # square-root scaling rule (official "sqrt_wrt_1024")
    run = Run(rank, world_size, device, micro, accum, cfg.base_lr * scale, cfg.highres_base_lr * scale,
              min(cfg.stop_after or cfg.total_iters, cfg.total_iters), precision, DTYPES[precision])
    derived = {k: v for k, v in asdict(run).items() if k not in ("device", "dtype")}
    print0(f"config: {json.dumps(asdict(cfg))}\nderived: {json.dumps(derived)}\nprecision: {precision} ({why})")
    return run


def wrap(student, teacher, cfg, device, distributed=True):
    """Activation checkpointing, then DDP (default) or FSDP2 (cfg.fsdp: each block, the backbone and the root,
    whose own parameters are the heads; the EMA copy is sharded the same way, so the EMA runs shard by shard),
    then torch.compile. -> the module to call; `student` stays the raw module. distributed=False: neither
    DDP nor FSDP2 even under torchrun (plan.py traces one process on fake tensors)."""
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint  # keeps parameter names, unlike checkpoint_wrapper
        for block in student.backbone.blocks:
            checkpoint(block)
    model = student
    if distributed and is_dist() and cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        for m in (student, teacher):
            for block in m.backbone.blocks:
                fully_shard(block)
            fully_shard(m.backbone)
            fully_shard(m)  # the heads: gathered for the whole forward, so the iBOT loss can use them in chunks
    elif distributed and is_dist():
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


@contextlib.contextmanager
def gathered(module):
    """Under FSDP2: the root's own parameters (the heads) whole inside the block, every shard freed after it
    (a forward without a backward would otherwise keep its parameters gathered); no-op otherwise."""
    if not hasattr(module, "unshard"):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        for m in module.modules():
            if hasattr(m, "reshard"):
                m.reshard()


# ---------------------------------------------------------------------------------------------------------------
# The run directory: nothing overwritten by accident, one writer at a time, resume only what can continue
# ---------------------------------------------------------------------------------------------------------------
class RunError(ValueError):
    """A run that must not start (main prints it as one line and exits with status 2)."""


@contextlib.contextmanager
def refusals():
    """Around a script's work: a RunError, a refused value ("--flag: ...") or a missing file (a dataset, a
    teacher) ends in one line "<script>: error: ..." and exit status 2; anything else is a bug and keeps its
    traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if not (isinstance(e, (RunError, FileNotFoundError)) or str(e).startswith("--")):
            raise
        cli.error(str(e))


def open_run_dir(cfg, run, resumable):
    """Claim cfg.output_dir for this run -> the checkpoint to resume from (a dict) or None. Refuses to start
    over an existing checkpoint without --resume or --overwrite, --resume without a checkpoint, and (unless
    --allow_changes) a resume whose config changes a field outside `resumable` (the fields that do not change
    what the run computes, listed beside the config); prints every difference. Every rank checks (same files,
    same answer); rank 0 holds the lock file. The checkpoint is memory-mapped, not read: its pages are shared by
    the ranks of a node, and each rank copies out only what it keeps (under FSDP2, its shards)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    refused = None
    if run.rank == 0:
        try:
            take_lock(os.path.join(cfg.output_dir, "run.lock"))
        except RunError as e:
            refused = e
    if is_dist():  # every rank stops if rank 0 could not take the lock (else they would wait in collectives)
        flag = torch.tensor(float(refused is not None), device=run.device)
        dist.all_reduce(flag)
        if flag.item() and refused is None:
            raise RunError(f"rank 0 could not take the lock of {cfg.output_dir}")
    if refused:
        raise refused
    path = os.path.join(cfg.output_dir, "checkpoint.pth")
    exists = os.path.exists(path)
    if cfg.resume and not exists:
        raise RunError(f"--resume: no checkpoint at {path}; start a new run without --resume")
    if exists and not cfg.resume and not cfg.overwrite:
        raise RunError(f"{cfg.output_dir} already holds a run ({path}); continue it with --resume, replace it "
                       f"with --overwrite true, or choose another --output_dir")
    metrics = os.path.join(cfg.output_dir, "metrics.jsonl")
    if not cfg.resume:
        if run.rank == 0 and os.path.exists(metrics):
            os.remove(metrics)  # --overwrite: the old run's rows would mix with the new ones
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved, current = ckpt["config"], asdict(cfg)
    defaults = {f.name: f.default for f in fields(cfg)}
    saved = {k: saved.get(k, defaults[k]) for k in current}  # a field newer than the checkpoint: its default ran
    changed = {k: (saved[k], v) for k, v in current.items() if _plain(saved[k]) != _plain(v)}
    for k, (old, new) in changed.items():
        print0(f"resume: {k} was {old!r}, now {new!r}")
    breaking = sorted(set(changed) - set(resumable))
    if breaking and not cfg.allow_changes:
        raise RunError(f"--resume with changed {', '.join(breaking)} would continue a different run (lr, data "
                       f"order or model); restore them, or pass --allow_changes true")
    if run.rank == 0 and os.path.exists(metrics):  # drop rows logged after the checkpoint: they are redone
        with open(metrics) as f:
            rows = [line for line in f if json.loads(line).get("step", 0) <= ckpt["step"]]
        with open(metrics, "w") as f:
            f.writelines(rows)
    return ckpt


def _plain(value):
    return list(value) if isinstance(value, tuple) else value  # a tuple field may come back as a list


def take_lock(path):
    """One run per directory: create `path` exclusively with "pid host"; a lock left by a dead process on this
    host is taken over. Released at the end of the loop or when the process exits."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                owner = f.read().split()
            pid, host = (int(owner[0]), owner[1]) if len(owner) == 2 else (0, "")
            if not owner or host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
                os.remove(path)  # empty (killed while writing it), ours from an earlier run, or its process is gone
                continue
            raise RunError(f"{os.path.dirname(path)} is in use by process {pid} on {host or '?'} ({path}); "
                           f"wait for it, or delete the lock file if that process is gone")
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}")
        atexit.register(release_lock, path)
        return
    raise RunError(f"could not take the lock {path}")


def release_lock(path):
    """Remove the lock file if this process holds it (train_loop's end, and at exit)."""
    try:
        with open(path) as f:
            mine = f.read().split()[:1] == [str(os.getpid())]
        if mine:
            os.remove(path)
    except OSError:
        pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: unsharded, atomic, loadable with weights_only=True
# ---------------------------------------------------------------------------------------------------------------
def full_state_dicts(model, ema, optimizer, cfg):
    """Unsharded state dicts -> (model, ema, optimizer or None); every rank must call this (FSDP2 gathers the
    shards). The optimizer's state and groups are keyed by parameter name in every layout (one process, DDP,
    FSDP2), so a checkpoint of one layout resumes in any other with AdamW's moments."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, ema_sd = (get_model_state_dict(m, options=opts) for m in (model, ema))
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_sd, ema_sd, optim_sd


def load_state_dicts(model, ema, optimizer, model_sd, ema_sd, optim_sd, cfg):
    """Inverse of full_state_dicts: every rank keeps what it holds of the full state dicts (FSDP2: its shards).
    Under torchrun rank 0 reads the (memory-mapped) file and sends each tensor to the others, which keep their
    part: no rank holds a whole copy in private memory (`torchrun ... bench.py resume` measures it).
    An optimizer state keyed by position (written before it was keyed by name) is renamed first."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_dist())
    set_model_state_dict(model, model_sd, options=opts)
    set_model_state_dict(ema, ema_sd, options=opts)
    if optim_sd["state"] and isinstance(next(iter(optim_sd["state"])), int):
        optim_sd = keyed_by_name(optim_sd, model, optimizer)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)


def keyed_by_name(optim_sd, model, optimizer):
    """torch's optimizer.state_dict() keys parameters by their position in the groups; the groups here are
    built the same way on every layout, so position i is the i-th parameter of optimizer.param_groups."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    positions = [i for g in optim_sd["param_groups"] for i in g["params"]]
    rename = dict(zip(positions, names))
    return dict(state={rename[i]: v for i, v in optim_sd["state"].items()},
                param_groups=[dict(g, params=[rename[i] for i in g["params"]]) for g in optim_sd["param_groups"]])


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


def atomic_save(obj, path):
    """torch.save to a temporary file of this process, then rename: a crash mid-write never leaves a broken file
    at `path`, and two writers never share a temporary file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_backbone(path, state_dict, model_args):
    """The backbone alone (the "backbone.*" entries of a DinoV2 state dict) as a bare state dict in the official
    key layout, as the released hub weights, plus <stem>.json with the constructor kwargs (model.load_model)."""
    backbone = {k.removeprefix("backbone."): v.cpu() for k, v in state_dict.items() if k.startswith("backbone.")}
    atomic_save(backbone, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(model_args=model_args), f, indent=1)


# ---------------------------------------------------------------------------------------------------------------
# Progress, metrics and model FLOP utilisation; preemption
# ---------------------------------------------------------------------------------------------------------------
def native_bf16(device):
    """Whether bf16 matmuls run natively: on GPUs, and on CPUs with AVX512-BF16 or AMX. Elsewhere a CPU emulates
    them, many times slower than fp32."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision, device):
    """--precision auto -> bf16 where it is native, fp32 where it would be emulated -> (precision, reason)."""
    if precision != "auto":
        return precision, "--precision"
    if native_bf16(device):
        return "bf16", "auto: native bf16 on " + ("this GPU" if device.type == "cuda" else "this CPU (AVX512-BF16/AMX)")
    return "fp32", "auto: this CPU has no AVX512-BF16 or AMX, so bf16 would be emulated"


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_host_memory():
    """On glibc (Linux): keep the memory a CPU step frees for the next step instead of giving it back to the
    system. A step allocates and frees its activations every time; by default glibc returns large blocks
    (munmap above the mmap threshold, heap trimming above the trim threshold), so every step page-faults them
    in and zeroes them again (thousands of page faults per tiny step: docs/benchmarks.md). Memory then stays at
    the run's peak, which a training loop reaches every step anyway; `python bench.py step --keep_freed_memory
    false` compares. -> whether applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators keep their own policy
        return False
    # Setting either parameter switches off glibc's dynamic threshold, so set both: 32 MiB is the largest mmap
    # threshold glibc accepts on 64-bit; blocks below it come from the heap, which is trimmed only above 1 GiB.
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


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


PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "GH200": 989, "B200": 2250, "A100": 312,
                    "A800": 312, "L40S": 362, "A10": 125, "L4": 121, "V100": 125}  # dense, vendor data sheets


def peak_flops(device):
    """The device's dense bf16 peak FLOP/s from its name, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS.items() if key in name.split()), None)


def progress(iterable=None, **tqdm_kwargs):
    """tqdm as usual on a terminal. To a file or pipe (a batch job's log) it redraws only every 10%
    of a known total and at least 10 s apart (unknown total: once a minute), so a 12,500-step loop
    writes about a dozen status lines instead of one every 0.1 s. tqdm's monitor thread would
    otherwise force a redraw every 10 s (maxinterval) whatever miniters says: switched off too."""
    stream = tqdm_kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        total = tqdm_kwargs.get("total")
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        if total:
            tqdm_kwargs.setdefault("miniters", max(1, math.ceil(total / 10)))
            tqdm_kwargs.setdefault("mininterval", 10.0)
        else:
            tqdm_kwargs.setdefault("mininterval", 60.0)
        tqdm_kwargs.setdefault("maxinterval", float("inf"))
    return tqdm(iterable, **tqdm_kwargs)


class Progress:
    """Rank 0's progress bar and metrics.jsonl: one row every cfg.log_every steps with the loss terms, schedule
    values, images/s, peak memory and, on a known GPU, model FLOP utilisation (MFU, as nanoGPT's estimate_mfu:
    FLOPs of a step, counted on the first one / step time / the device's dense bf16 peak)."""

    def __init__(self, cfg, run, start, desc="train"):
        self.cfg, self.run, self.desc, self.flops_per_step = cfg, run, desc, None
        self.peak = peak_flops(run.device)
        self.file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if run.rank == 0 else None
        self.bar = progress(total=run.stop_at, initial=start, disable=run.rank != 0, desc=desc, dynamic_ncols=True)
        self.t_last, self.logged = time.perf_counter(), start

    @contextlib.contextmanager
    def counting_flops(self):
        """Around the first step on a GPU whose peak is known: count its FLOPs (FlopCounterMode sees the real
        step, collectives included, on every rank) for MFU; a no-op afterwards and on CPUs."""
        if self.peak is None or self.flops_per_step is not None:
            yield
            return
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            yield
        self.flops_per_step = counter.get_total_flops() * self.run.world_size  # this rank's share x ranks

    def step(self, it, terms, hp):
        """After step `it`: terms {name: tensor or float} (loss terms, grad norm), hp the schedule values."""
        self.bar.update(1)
        if (it + 1) % self.cfg.log_every and it + 1 != self.run.stop_at:
            return
        seconds = (time.perf_counter() - self.t_last) / (it + 1 - self.logged)  # per step
        row = dict(step=it + 1, **hp, images_per_s=self.cfg.batch_size / seconds,
                   memory_gb=peak_memory_gb(self.run.device))
        if self.flops_per_step and self.peak:
            row["mfu"] = self.flops_per_step / self.run.world_size / seconds / self.peak
        row.update({k: float(getattr(v, "full_tensor", lambda: v)()) for k, v in terms.items()})
        self.t_last, self.logged = time.perf_counter(), it + 1
        shown = {k: f"{v:.3f}" for k, v in row.items() if k.endswith("loss")}
        self.bar.set_postfix(**shown, img_s=f"{row['images_per_s']:.0f}", refresh=False,
                             **({"mfu": f"{row['mfu']:.0%}"} if "mfu" in row else {}))
        self.write(row)

    def phase(self, it, text):
        """A phase of the schedule starts at iteration `it` (the run's start, the high-resolution phase): one
        line on the console, a row {"step", "phase"} in metrics.jsonl, and the bar's label."""
        self.bar.set_description(f"{self.desc} ({text.split(',')[0]})")
        self.write(dict(step=it, phase=text), f"iteration {it}: {text}")

    def write(self, row, message=None):
        if message and self.run.rank == 0:
            self.bar.write(message)
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


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

    def check(self, it, run, every):
        """After step `it` -> (write a checkpoint now, then stop): on a signal to any rank, every `every` steps
        and at the last step of this invocation."""
        stopping = self.any_rank(run.device)
        return stopping or (it + 1) % every == 0 or it + 1 == run.stop_at, stopping

    @staticmethod
    def exit(it):
        """Right after the checkpoint: a scheduler's grace period leaves no time for evaluation."""
        print0(f"\nstop signal: checkpoint written at iteration {it + 1}; continue with --resume")
        raise SystemExit(0)
