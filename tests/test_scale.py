"""The paper's run at toy size, through the entry points users launch (`python train.py`, `torchrun ...`):
one objective whatever the GPU layout, resume across layouts, distillation under DDP, and every phase of the
vit_g schedule (warmup, prototype freeze, teacher-temperature warmup, high-resolution crops) under torchrun with
FSDP2 and activation checkpointing. CPU, gloo, a 64-image IDX folder (conftest.idx_data).

Run: python -m pytest -q tests/test_scale.py   (a few minutes on 2 cores: each launch starts Python and torch)
"""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli, torchrun

# fp32 (exact comparisons), no LayerScale (with 1e-5 KoLeo's gradient amplifies rounding between layouts), drop
# path 0 (its draws are per rank), KoLeo groups of 4 consecutive images: a layout in which each group lies
# inside one forward pass of all ranks optimises the same objective.
COMMON = ["--batch_size", "16", "--total_iters", "4", "--warmup_iters", "1", "--teacher_temp_warmup_iters", "2",
          "--freeze_last_layer_iters", "1", "--num_workers", "0", "--precision", "fp32", "--layerscale", "0",
          "--koleo_group_size", "4"]


def checkpoint(folder):
    return torch.load(folder / "checkpoint.pth", weights_only=True)


def assert_same(got, expected, what, atol=1e-5):
    for name, value in expected.items():
        torch.testing.assert_close(without_key_bias(name, got[name]), without_key_bias(name, value), rtol=0,
                                   atol=atol, msg=f"{what}: {name}")


def without_key_bias(name, value):
    """A qkv bias without its key third. That third has no gradient in exact arithmetic (the softmax over keys
    ignores a shift all keys share), so its gradient is float rounding, which differs between layouts (matmul
    shapes, thread counts), and AdamW scales it up to steps of ~1e-5 where every other weight agrees to ~3e-7."""
    if not name.endswith("qkv.bias"):
        return value
    q, _, v = value.chunk(3)
    return torch.cat([q, v])


def test_every_layout_trains_the_same_student_and_resumes_across_layouts(idx_data):
    """One process (micro-batch = batch), one process with 4 accumulation steps, 2 ranks DDP and 2 ranks FSDP2
    with 2 accumulation steps give the same student; a one-process checkpoint resumes under 2-rank FSDP2 (AdamW
    state keyed by name) and ends where the uninterrupted run ends."""
    train = ["train.py", "--data", str(idx_data), *COMMON]
    runs = {"one": ([], False), "accumulation": (["--micro_batch_size", "4"], False), "ddp": ([], True),
            "fsdp_accumulation": (["--fsdp", "true", "--micro_batch_size", "4"], True)}
    for name, (flags, two_ranks) in runs.items():
        launch = dict(launcher=torchrun()) if two_ranks else {}
        out = run_cli(*train, "--output_dir", str(idx_data / name), *flags, **launch)
        assert out.returncode == 0, (name, out.stderr[-6000:])
    one = checkpoint(idx_data / "one")
    initial = torch.load(idx_data / "one" / "teacher_backbone.pth", weights_only=True)
    assert not torch.equal(one["student"]["backbone.cls_token"], one["teacher"]["backbone.cls_token"])
    for name in ("accumulation", "ddp", "fsdp_accumulation"):
        assert_same(checkpoint(idx_data / name)["student"], one["student"], name)
    # stopped by one process after 2 steps, continued by torchrun with 2 ranks and FSDP2
    cross = ["--output_dir", str(idx_data / "cross")]
    first = run_cli(*train, *cross, "--stop_after", "2")
    assert first.returncode == 0 and "teacher k-NN" not in first.stdout, first.stderr[-3000:]
    assert set(checkpoint(idx_data / "cross")["optimizer"]["state"]) >= {"backbone.cls_token", "dino_head.mlp.0.weight"}
    second = run_cli(*train, *cross, "--fsdp", "true", "--resume", launcher=torchrun())
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "teacher k-NN (k=20, T=0.07) top-1" in second.stdout
    resumed = checkpoint(idx_data / "cross")
    assert resumed["step"] == 4
    assert_same(resumed["student"], one["student"], "1 process -> 2 ranks FSDP2 resume")
    assert_same(resumed["optimizer"]["state"]["backbone.pos_embed"], one["optimizer"]["state"]["backbone.pos_embed"],
                "AdamW moments")
    assert set(torch.load(idx_data / "cross" / "teacher_backbone.pth", weights_only=True)) == set(initial)


def test_distillation_under_ddp_equals_one_process(idx_data):
    """The README's distillation launch without --fsdp (the students' unused mask token stopped DDP at step 2)."""
    teacher = ["train.py", "--data", str(idx_data), *COMMON, "--output_dir", str(idx_data / "teacher")]
    assert run_cli(*teacher).returncode == 0
    distill = ["distill.py", "--teacher", str(idx_data / "teacher" / "checkpoint.pth"), "--students",
               "vit_tiny_d2", "--data", str(idx_data), *COMMON[:2], "--total_iters", "3", "--num_workers", "0",
               "--precision", "fp32", "--layerscale", "0", "--koleo_group_size", "4"]
    one = run_cli(*distill, "--output_dir", str(idx_data / "one"))
    ddp = run_cli(*distill, "--output_dir", str(idx_data / "ddp"), launcher=torchrun())
    assert one.returncode == 0 and ddp.returncode == 0, (one.stderr[-2000:], ddp.stderr[-3000:])
    assert "vit_tiny_d2 (EMA)" in ddp.stdout  # the report at the end, under torchrun
    got, expected = (checkpoint(idx_data / name)["students"][0] for name in ("ddp", "one"))
    assert_same(got["ema"], expected["ema"], "distillation DDP")
    assert not torch.equal(expected["ema"]["backbone.cls_token"], expected["student"]["backbone.cls_token"])


SCALE = 6250  # the vit_g preset's 625,000 steps become 100


def scaled(iterations):
    return max(1, round(iterations / SCALE))


def test_vit_g_schedule_at_toy_size_under_torchrun_fsdp2_activation_checkpointing(idx_data):
    """The vit_g preset's control flow at toy width and length, in the paper's proportions: warmup (16%),
    prototypes frozen for an epoch, teacher temperature warmup (6%), the high-resolution phase (1.6%) with its
    own schedule. Every logged schedule value at each boundary is checked against the config's numbers."""
    from train import PRESETS, Config
    paper = Config(**PRESETS["vit_g"])
    steps = {k: scaled(getattr(paper, k)) for k in ("total_iters", "warmup_iters", "teacher_temp_warmup_iters",
                                                     "freeze_last_layer_iters", "highres_iters",
                                                     "highres_warmup_iters")}
    assert steps == dict(total_iters=100, warmup_iters=16, teacher_temp_warmup_iters=6, freeze_last_layer_iters=1,
                         highres_iters=2, highres_warmup_iters=1)
    toy = ["--arch", "vit_tiny", "--patch_size", "7", "--global_crop_size", "28", "--local_crop_size", "14",
           "--highres_global_crop_size", "42", "--n_local_crops", "2", "--n_prototypes", "64",
           "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--ibot_head_bottleneck_dim", "32",
           "--batch_size", "8", "--micro_batch_size", "2", "--koleo_group_size", "4", "--num_workers", "0",
           "--log_every", "1", "--checkpoint_every", "1000", "--precision", "fp32"]
    flags = [x for k, v in steps.items() for x in (f"--{k}", str(v))]
    out = run_cli("train.py", "--preset", "vit_g", "--data", str(idx_data), "--output_dir", str(idx_data / "g"),
                  "--fsdp", "true", "--activation_checkpointing", "true", *toy, *flags, launcher=torchrun())
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"accumulation_steps": 2' in out.stdout and '"drop_path_rate": 0.4' in out.stdout  # the preset's
    rows = [json.loads(line) for line in open(idx_data / "g" / "metrics.jsonl")]
    phases = [(r["step"], r["phase"].split(",")[0]) for r in rows if "phase" in r]
    assert phases == [(0, "global crops 28 px"), (98, "global crops 42 px")]
    at = {r["step"] - 1: r for r in rows if "loss" in r}  # iteration -> its row
    assert len(at) == 100 and all(np.isfinite(r["loss"]) for r in at.values())
    lr = paper.base_lr * np.sqrt(8 / 1024)  # square-root scaling rule at batch 8
    highres_lr = paper.highres_base_lr * np.sqrt(8 / 1024)
    assert at[0]["lr"] == 0 and at[15]["lr"] == pytest.approx(lr)  # linear warmup over 16 iterations
    assert at[0]["last_layer_lr"] == 0 and at[1]["last_layer_lr"] == at[1]["lr"] > 0  # frozen for the first
    assert at[0]["teacher_temp"] == 0.04 and at[5]["teacher_temp"] == pytest.approx(0.07)
    assert at[4]["teacher_temp"] < 0.07 and at[97]["teacher_temp"] == 0.07
    assert at[0]["momentum"] == pytest.approx(0.994) and at[97]["momentum"] == pytest.approx(1.0, abs=1e-3)
    assert at[0]["wd"] == pytest.approx(0.04) and at[97]["wd"] == pytest.approx(0.2, abs=1e-3)
    assert at[97]["lr"] == pytest.approx(1e-6, rel=0.2) and at[97]["global_crop_size"] == 28
    # the high-resolution phase: 42-px crops (the 4x4 position grid interpolated to 6x6), its own schedule
    assert [at[i]["global_crop_size"] for i in (98, 99)] == [42, 42]
    assert at[98]["lr"] == 0 and at[99]["lr"] == pytest.approx(highres_lr)
    assert all(at[i][k] == v for i in (98, 99) for k, v in
               dict(momentum=0.999, teacher_temp=0.07, wd=0.04).items())
    assert torch.load(idx_data / "g" / "checkpoint.pth", weights_only=True)["step"] == 100
