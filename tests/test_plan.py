"""Tests of plan.py (the per-GPU plan of a step and the run at a glance) and bench.py's step benchmark.

Run: python -m pytest -q tests/test_plan.py   (RUN_SLOW=1 adds the full ViT-L trace and the measured benchmark)
"""
import dataclasses

import numpy as np
import pytest
import torch

import bench
import distill as DI
import plan
import train as T
from conftest import run_cli

TEST_ARCH = dict(embed_dim=96, depth=8, num_heads=3)
TINY = dict(arch="vit_plan", patch_size=4, layerscale=0.0, drop_path_rate=0.0, n_prototypes=64, head_hidden_dim=64,
            head_bottleneck_dim=32, ibot_head_bottleneck_dim=32, global_crop_size=16, local_crop_size=8,
            n_local_crops=2, batch_size=8, koleo_group_size=4, total_iters=10, warmup_iters=2, highres_iters=0,
            precision="fp32")


@pytest.fixture(autouse=True)
def plan_arch(monkeypatch):
    monkeypatch.setitem(T.ARCHS, "vit_plan", TEST_ARCH)


def test_trace_counts_the_step_it_runs():
    cfg = T.Config(**TINY)
    trace = plan.trace_step(cfg, 8)
    student, teacher, _ = T.build_student_teacher(cfg)
    n = sum(p.numel() for p in student.parameters())
    assert trace["param"] == 4 * 2 * n  # student and teacher, fp32, every parameter once
    trainable = [p for p in student.parameters() if p.requires_grad]
    moments = 2 * sum(p.numel() for p in trainable)  # AdamW's two moments exist in the traced (second) step
    assert trace["opt"] == 4 * (moments + len(trainable))  # fp32, plus one step counter per tensor
    assert trace["act"] > 0
    doubled = plan.trace_step(cfg, 16, memory=False)
    assert doubled["flops"] == pytest.approx(2 * trace["flops"], rel=0.05)  # FLOPs grow with the images


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trace_holds_what_a_real_step_holds(checkpointing):
    """The fake trace's peak equals MemTracker's peak around the same step on real tensors (activation
    checkpointing included: only the checkpointed blocks' inputs stay alive to the step's end)."""
    cfg = T.Config(**TINY, activation_checkpointing=checkpointing, attn_impl="fused")
    student, teacher, _ = T.build_student_teacher(cfg)
    real = T.build_student(student, teacher, cfg, torch.device("cpu"), distributed=False)
    hp = dict(lr=1e-4, last_layer_lr=1e-4, wd=0.04, momentum=0.994, teacher_temp=0.04)
    batch, centers = plan.real_batch(cfg, 8), T.zero_centers(cfg.n_prototypes, torch.device("cpu"))
    T.train_step(real, teacher, [batch], hp, centers, cfg, torch.float32)  # AdamW's state, as in the trace
    tracker = plan.peak_tracker()
    teacher.requires_grad_(True)
    tracker.track_external(real.model, teacher, real.optimizer)
    with tracker:
        T.train_step(real, teacher, [batch], hp, centers, cfg, torch.float32)
    measured = next(iter(tracker.get_tracker_snapshot("peak").values()))
    assert plan.trace_step(cfg, 8)["total"] == pytest.approx(measured["Total"], rel=0.01)


def test_shallow_traces_extrapolate_to_the_full_depth():
    """Blocks are identical: copies with 2 and 4 blocks give the 8-block step's memory within 2% and FLOPs exactly."""
    cfg = T.Config(**TINY, activation_checkpointing=True)
    full, guess = plan.trace_step(cfg, 8), plan.extrapolated(cfg, 8)
    assert guess["flops"] == pytest.approx(full["flops"], rel=1e-9)
    for kind in ("param", "opt", "total"):
        assert guess[kind] == pytest.approx(full[kind], rel=0.02), kind


def test_larger_micro_batches_extrapolate_from_two_traced_ones():
    """Beyond the traced micro-batch the step's memory is the line through traces at 4 and 8 images: at 32
    images within 2% of the full trace (the same moment is the peak: activation checkpointing keeps it one)."""
    cfg = T.Config(**{**TINY, "batch_size": 32}, activation_checkpointing=True)
    full, guess = plan.trace_step(cfg, 32), plan.extrapolated(cfg, 32, traced=8)
    assert guess["flops"] == pytest.approx(full["flops"], rel=0.005)  # the collate's mask counts vary a little
    assert guess["total"] == pytest.approx(full["total"], rel=0.02)
    eight = plan.trace_step(cfg, 8)
    assert guess["per_image"] == pytest.approx((full["total"] - eight["total"]) / 24, rel=0.02)


def test_fit_uses_the_line_of_the_peak_in_the_micro_batch():
    """Hand arithmetic: 10 GB that do not grow, 2 GB per image; a 0.9 x 80 GB budget holds 31 images, the
    largest divisor of the 64 images per GPU below that is 16. Without a line every byte beyond parameters,
    gradients and optimizer state grows with the images."""
    cfg = T.Config(**{**TINY, "batch_size": 64, "micro_batch_size": 32})
    trace = dict(param=4e9, grad=0, opt=4e9, buffer=0, act=2e9 + 64e9, total=74e9, per_image=2e9)
    peak, best, at_zero, slope = plan.fit(cfg, trace, 1, 80)
    assert (peak, best, at_zero, slope) == (74e9, 16, 10e9, 2e9)
    peak, best, at_zero, slope = plan.fit(cfg, {k: v for k, v in trace.items() if k != "per_image"}, 1, 80)
    assert (at_zero, slope, best) == (8e9, 66e9 / 32, 16)


def test_fsdp_plan_shards_what_is_sharded_and_keeps_what_is_gathered():
    """Against hand arithmetic on the traced parts: FSDP2 over 8 GPUs keeps 1/8 of the parameters, gradients and
    AdamW state, two blocks being gathered and the heads whole; DDP adds gradient buckets."""
    cfg = T.Config(**TINY)
    trace = plan.trace_step(cfg, 8)
    student, _, _ = T.build_student_teacher(cfg)
    heads = 4 * sum(p.numel() for m in (student.dino_head, student.ibot_head) for p in m.parameters())
    block = 4 * sum(p.numel() for p in student.backbone.blocks[0].parameters())
    assert (trace["gathered"], trace["block"]) == (heads, block)
    static = trace["param"] + trace["grad"] + trace["opt"]
    fsdp = plan.per_gpu_memory(dataclasses.replace(cfg, fsdp=True), trace, 8)
    assert fsdp == pytest.approx(static / 8 + trace["total"] - static + 2 * block + 2 * heads)
    assert plan.per_gpu_memory(cfg, trace, 8) == trace["total"] + trace["grad"]


def test_glance_counts_images_and_gpu_hours_of_each_phase():
    cfg = T.Config(**{**TINY, "total_iters": 100, "warmup_iters": 10, "highres_iters": 5,
                      "highres_global_crop_size": 24})
    lines = []
    hours = plan.glance(cfg, {16: 1e12, 24: 3e12}, 4, "H100", 0.5, lines.append)
    expected = (95 * 8 * 1e12 + 5 * 8 * 3e12) / (0.5 * 989e12) / 3600  # images x FLOPs / (MFU x peak)
    assert hours == pytest.approx(expected)
    assert [line.split()[0] for line in lines[1:4]] == ["warmup", "cosine", "high-res"]
    assert "crops 24/8 px" in lines[3] and "momentum 0.9990->0.9990" in lines[3]


def test_plan_command_line(tmp_path):
    out = run_cli("plan.py", "train", "--preset", "vit_s", "--world_size", "8", "--arch", "vit_tiny",
                  "--n_prototypes", "1024", "--micro_batch_size", "16", "--koleo_group_size", "16")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "plan: vit_tiny, 8 GPU(s), DDP, bf16, micro-batch 16 x accumulation 16 = global batch 2048" in out.stdout
    assert "largest micro-batch that fits: 256 at 518 px, 256 at 224 px" in out.stdout and "GPU-hours" in out.stdout
    refused = run_cli("plan.py", "train", "--preset", "vit_g", "--world_size", "96")
    assert refused.returncode == 2 and "--batch_size: 3072 must be" in refused.stderr.splitlines()[-1]
    assert run_cli("plan.py").returncode == 2


def test_distillation_plan_from_a_teacher_checkpoint(tmp_path):
    tcfg = T.Config(**TINY)
    _, teacher, args = T.build_student_teacher(tcfg)
    torch.save(dict(config=dataclasses.asdict(tcfg), model_args=args, teacher=teacher.state_dict()),
               tmp_path / "t.pth")
    cfg = DI.DistillConfig(**{k: v for k, v in TINY.items() if k not in ("arch", "n_prototypes")},
                           teacher=str(tmp_path / "t.pth"), students="vit_plan,vit_mini")
    lines = []
    result = plan.plan(cfg, 1, 80, plan.distillation, log=lines.append)
    assert result["fits"] and result["best_micro_batch"] == 8 and result["tflops_per_image"] > 0
    assert lines[0].startswith("plan: vit_plan,vit_mini, 1 GPU(s)")


@pytest.mark.slow
def test_vit_l_extrapolation_against_the_full_trace():  # a few minutes on 2 cores
    cfg = T.Config(**{**T.PRESETS["vit_l"], "fsdp": True, "activation_checkpointing": True})
    full, guess = plan.trace_step(cfg, 8), plan.extrapolated(cfg, 8)
    assert guess["flops"] == pytest.approx(full["flops"], rel=1e-9)
    assert guess["total"] == pytest.approx(full["total"], rel=0.02)


@pytest.mark.slow
def test_vit_s_micro_batch_extrapolation_against_the_full_trace():  # about a minute on 2 cores
    cfg = T.Config(**{**T.PRESETS["vit_s"], "micro_batch_size": 64})
    full, guess = plan.trace_step(cfg, 64, global_crop_size=518), plan.extrapolated(cfg, 64, global_crop_size=518)
    assert guess["flops"] == pytest.approx(full["flops"], rel=0.005)
    assert guess["total"] == pytest.approx(full["total"], rel=0.02)


@pytest.mark.slow
def test_bench_step_measures_and_plan_is_within_20_percent(capsys):  # ~10 minutes on 2 cores (ViT-S/14 steps)
    results = bench.bench_step(bench.BenchConfig(repeats=1))
    assert len(results) in (2, 4) and "ViT-S/14" in capsys.readouterr().out
    for r in results:
        assert 0 < r["mfu"] < 1.5 and r["images_per_s"] > 0
        if r["precision"] == "fp32":  # bf16 on CPU runs the explicit attention: its extra copies are traced too
            assert abs(r["plan_gb"] / r["peak_gb"] - 1) <= 0.2, r
    assert np.isfinite([r["gflops"] for r in results]).all()
