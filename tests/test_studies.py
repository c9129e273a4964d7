"""Tests for studies.py: every study at the "toy" size through its own entry points (train.train,
distill.distill, curate.retrieve, eval.py's measures), the tables' statistics, the run cache, and the
ablation switches the studies rely on (tied heads, iBOT off).

Run: python -m pytest -q tests/test_studies.py   (~2.5 min on 2 cores; the studies share one run cache)
"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import studies
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy study config, one output folder for the whole module (the baseline arm trains once)."""
    return studies.StudyConfig(**studies.PRESETS["toy"], out=str(tmp_path_factory.mktemp("studies")))


def check_record(record, scfg, metrics):
    """Every row: one value per seed for each metric, percentages in [0, 100], and the row's mean and std are
    summary() of those values (summary itself is checked on known values below); the JSON on disk is the record."""
    for row in record["rows"]:
        for m in metrics:
            values = row[m]["values"]
            assert len(values) == (len(scfg.seeds) if row["runs"] != [scfg.teacher] else 1)
            assert row[m] == studies.summary(values)
            assert all(0.0 <= v <= 100.0 for v in values), (m, values)
    with open(os.path.join(scfg.out, f"{record['study']}.json")) as f:
        assert json.load(f) == json.loads(json.dumps(record))


def test_summary_on_known_values():
    assert studies.summary([1.0, 2.0, 3.0]) == dict(mean=2.0, std=1.0, values=[1.0, 2.0, 3.0])
    two = studies.summary([2.0, 4.0])  # the sample std (ddof=1): sqrt(2); the population std would be 1
    assert two["mean"] == 3.0 and two["std"] == pytest.approx(2 ** 0.5)
    assert studies.summary([5.0]) == dict(mean=5.0, std=0.0, values=[5.0])  # one seed (the teacher row)


@pytest.mark.parametrize("values, cell", [([2.99, 2.69], "2.84 ± 0.21"), ([1.75, 2.01], "1.88 ± 0.18"),
                                          ([55.95, 55.97], "55.96 ± 0.01"), ([56.85, 56.95], "56.90 ± 0.07"),
                                          ([72.31, 72.39], "72.35 ± 0.06")])
def test_table_cells_from_the_per_seed_values_in_docs(values, cell, capsys):
    """docs/studies.md quotes these per-seed values beside the table cells print_table made of them."""
    record = dict(study="s", question="q", config=dict(seeds=[0, 1]),
                  rows=[dict(arm="a", steps=300, train_min=None, knn=studies.summary(values))])
    studies.print_table(record, ("knn",))
    assert capsys.readouterr().out.splitlines()[-1] == f"| a | 300 | - | {cell} |"


def run_config_of(folder):
    return torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=True)["config"]


def test_koleo_study_trains_each_arm_and_reuses_finished_runs(toy, monkeypatch):
    record = studies.run_study("koleo", toy, torch.device("cpu"))
    check_record(record, toy, ("knn", "copy_map"))
    init, with_koleo, without = record["rows"]
    assert init["steps"] == 0 and init["runs"] == [f + "_init" for f in with_koleo["runs"]]  # its config, untrained
    before, after = (studies.load_model(os.path.join(f, "teacher_backbone.pth")).state_dict()
                     for f in (init["runs"][0], with_koleo["runs"][0]))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert [run_config_of(f)["koleo_loss_weight"] for f in with_koleo["runs"]] == [0.1, 0.1]
    assert [run_config_of(f)["koleo_loss_weight"] for f in without["runs"]] == [0.0, 0.0]
    assert [run_config_of(f)["seed"] for f in without["runs"]] == [0, 1]
    assert run_config_of(without["runs"][0])["total_iters"] == toy.steps
    # a second call trains nothing and measures nothing: the same numbers, from the runs' folders
    monkeypatch.setattr(studies, "train", lambda cfg: pytest.fail("trained a finished run again"))
    monkeypatch.setattr(studies, "measure", lambda *a: pytest.fail("measured a measured run again"))
    assert studies.run_study("koleo", toy, torch.device("cpu"))["rows"] == record["rows"]


def test_ibot_study_without_masks_has_no_ibot_loss(toy):
    record = studies.run_study("ibot", toy, torch.device("cpu"))
    check_record(record, toy, ("knn", "linear", "patch"))
    for folder in record["rows"][2]["runs"]:
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"ibot"' in line]
        assert rows and all(r["ibot"] == 0.0 and np.isfinite(r["loss"]) for r in rows)
    assert record["rows"][1]["runs"][0] in studies.run_study("koleo", toy, torch.device("cpu"))["rows"][1]["runs"]


@pytest.mark.parametrize("name", ["centering", "heads", "multicrop"])
def test_other_studies_train_their_arms_at_toy_size(toy, name):
    record = studies.run_study(name, toy, torch.device("cpu"))
    check_record(record, toy, studies.STUDIES[name].metrics)
    changed = studies.STUDIES[name].arms[1]
    for folder in record["rows"][2]["runs"]:
        cfg = run_config_of(folder)
        assert {k: cfg[k] for k in changed.changes} == changed.changes
        # 3 toy steps; multicrop: round(3 x 1.44) = 4, the FLOPs of 3 steps with local crops
        assert cfg["total_iters"] == record["rows"][2]["steps"] == dict(centering=3, heads=3, multicrop=4)[name]


def test_tied_heads_share_one_module():
    cfg = studies.run_config(studies.StudyConfig(**studies.PRESETS["toy"]), studies.Arm("tied", dict(
        ibot_separate_head=False)), seed=0)
    student, teacher, _ = train.build_student_teacher(cfg)
    assert student.ibot_head is student.dino_head and teacher.ibot_head is teacher.dino_head
    untied, _, _ = train.build_student_teacher(replace(cfg, ibot_separate_head=True))
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(untied) - n(student) == n(untied.ibot_head)
    assert any(k.startswith("ibot_head.") for k in student.state_dict())  # the official checkpoint layout


def test_arm_steps_for_known_flop_ratios(monkeypatch):
    base, global_only = studies.STUDIES["multicrop"].arms
    monkeypatch.setattr(studies, "step_flops", lambda cfg: 144.0 if cfg.n_local_crops else 100.0)  # ratio 1.44
    assert studies.arm_steps(studies.StudyConfig(), global_only, base) == 432  # 300 x 1.44
    assert studies.arm_steps(studies.StudyConfig(steps=3), global_only, base) == 4  # round(4.32)
    monkeypatch.setattr(studies, "step_flops", lambda cfg: pytest.fail("traced an arm without equal_flops"))
    assert studies.arm_steps(studies.StudyConfig(), base, base) == 300
    assert studies.arm_steps(studies.StudyConfig(), studies.Arm("x", dict(n_local_crops=0)), base) == 300


def test_multicrop_arm_gets_the_steps_of_equal_flops():
    """Traced FLOPs at the studies' default size: a step with local crops costs 1.43x -> 431 steps (the runs in
    docs/studies.md had 433, before the iBOT scores were recomputed in chunks)."""
    base, global_only = studies.STUDIES["multicrop"].arms
    assert studies.arm_steps(studies.StudyConfig(), global_only, base) == 431


def test_distill_study_against_the_student_from_scratch(toy, tmp_path):
    teacher_cfg = replace(studies.run_config(toy, studies.Arm("teacher"), 0), output_dir=str(tmp_path / "t"))
    train.train(teacher_cfg)
    scfg = replace(toy, teacher=str(tmp_path / "t" / "checkpoint.pth"))
    record = studies.run_study("distill", scfg, torch.device("cpu"))
    check_record(record, scfg, ("knn",))
    labels = [r["arm"] for r in record["rows"]]
    assert labels[0].startswith("untrained") and labels[-1].startswith("teacher") and len(labels) == 5
    distilled, masked, scratch = (run_config_of(r["runs"][0]) for r in record["rows"][1:4])
    assert studies.load_model(record["rows"][0]["runs"][0] + "/teacher_backbone.pth").n_blocks == 2
    assert (distilled["mask_probability"], distilled["drop_path_rate"]) == (0.0, 0.0)
    assert (masked["mask_probability"], masked["drop_path_rate"]) == (0.5, 0.1)
    assert distilled["students"] == "vit_tiny_d2" and scratch["arch"] == "vit_tiny_d2"


def test_retrieval_measures_on_known_sets():
    x = np.eye(6, dtype=np.float32)  # 6 orthogonal pool images
    in_class, modes = np.array([1, 1, 1, 1, 0, 0], bool), np.array([0, 0, 1, 1])
    everything = studies.retrieval_measures(x, np.arange(4), in_class, modes)
    assert everything["purity"] == 100.0 and everything["modes"] == 100.0 and everything["retrieved"] == 4
    half = studies.retrieval_measures(x, np.array([0, 1, 4, 5]), in_class, modes)
    assert half["purity"] == 50.0 and half["modes"] == 50.0


def test_retrieval_study_compares_both_modes_at_about_equal_size(toy):
    record = studies.retrieval_study(toy)
    check_record(record, toy, ("purity", "modes"))
    assert len(record["rows"]) == 2 * len(studies.CURATED_CLASSES)
    for cluster, sample in zip(record["rows"][::2], record["rows"][1::2]):
        assert "cluster" in cluster["arm"] and "sample" in sample["arm"]
        for c, s in zip(cluster["retrieved"]["values"], sample["retrieved"]["values"]):
            k = max(1, -(-c // toy.curated_size))  # the sample mode's k
            assert s <= k * toy.curated_size  # k per curated image, duplicates across images merged: < c + size
            assert s >= max(k, c / 2)  # and not far fewer than the cluster mode took


@pytest.mark.parametrize("argv, message", [(["nope"], "invalid choice"),
                                           (["distill", "--teacher", "/no/such.pth"], "does not exist")])
def test_command_line_errors_are_one_line(argv, message, tmp_path):
    out = subprocess.run([sys.executable, "studies.py", *argv, "--preset", "toy", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
