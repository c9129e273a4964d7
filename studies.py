"""What each part of DINOv2 does, measured: small ablation studies on 2 CPU cores (arXiv 2304.07193, Tab. 3,
Sec. 4-5, App. A.4), answering the paper's questions by running this code rather than by quoting it.

Each study trains short runs of train.py's tiny preset (Fashion-MNIST, 28 px, schedules scaled to --steps), one
per arm and seed, through train.train / distill.distill (no copy of the step), evaluates every run the same way
with eval.py's functions, prints one table (mean +- standard deviation over the seeds) and writes it with every
per-seed value to <out>/<study>.json. A run is kept in <out>/runs/<hash of its config>/: an arm shared by two
studies (the baseline) trains once, an interrupted run resumes from its checkpoint, and a finished one is reused.

Run (docs/studies.md has these tables with their times and what they do and do not show):
    python studies.py koleo        # KoLeo on / off -> k-NN, copy-retrieval mAP (Tab. 3: KoLeo helps retrieval)
    python studies.py ibot         # iBOT loss and masking both on / both off -> k-NN, linear, patch probe
    python studies.py centering    # Sinkhorn-Knopp vs EMA centering of the teacher (Sec. 4)
    python studies.py heads        # untied vs tied DINO / iBOT heads (Sec. 4)
    python studies.py multicrop    # 2 global crops only vs 2 global + 4 local, at equal FLOPs (App. B)
    python studies.py distill      # Sec. 5 distillation vs + masks and drop path (3 changes) vs from scratch
    python studies.py retrieval    # curate.py: cluster- vs sample-based retrieval for a small curated set
    python studies.py all          # every study in turn
    python studies.py koleo --seeds 0,1,2 --steps 600     # more seeds, longer runs
    python studies.py koleo --preset toy                  # seconds, tiny evaluations: what the tests run

Paper -> code
  Tab. 3, one component removed at a time ........... STUDIES, run_study, trained (train.train)
  Tab. 3 k-NN / linear probe ....................... measure: eval.run_knn, eval.run_linear
  Tab. 3 / Tab. 9 instance (copy) retrieval ......... measure: eval.run_retrieval (mAP over edit strengths)
  Tab. 10's linear layer on patch tokens ............ patch_probe (image labels: not Tab. 3's segmentation)
  App. B multi-crop, at equal compute ............... Arm.equal_flops, step_flops (plan.trace_step)
  Sec. 5 / Fig. 5 distillation vs from scratch ...... Arm(kind="distill"): distill.distill; teacher_row
  App. A.4 sample- vs cluster-based retrieval ........ retrieval_study (curate.retrieve)

Shape legend: N images, P patches per image, D width, C classes.
"""
import hashlib
import json
import math
import os
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

import cli
import curate
import embeddings
import eval as ev
import plan
from cli import at_least
from augment import resize
from data import build_dataset, eval_transform, subset
from distill import DISTILL_PRESETS, DistillConfig, distill
from model import load_model
from runtime import save_backbone
from train import PRESETS as TRAIN_PRESETS, Config, build_student_teacher, train


# ---------------------------------------------------------------------------------------------------------------
# Configuration: the size of every study (defaults: the runs in docs/studies.md); "toy" for the tests
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StudyConfig:
    seeds: tuple = (0, 1)  # one run per arm and seed (init, data order, augmentations); tables: mean +- std
    steps: int = 300  # training iterations per run; warmups scale with it as in the tiny preset (10%, 30%)
    batch_size: int = 64  # images per step (the tiny preset's)
    out: str = "runs/studies"  # <study>.json, and runs/<hash>/ per trained run (reused when the config matches)
    teacher: str = "runs/tiny/checkpoint.pth"  # distill study: the frozen teacher (`python train.py` writes it)
    knn_train: int = 10000  # k-NN (k=20, T=0.07): a fixed subset of the 60k training images; 0 = all
    knn_test: int = 0  # k-NN and linear probe: test images; 0 = all 10k
    linear_train: int = 10000  # linear probe: training images (eval.py's grid, 10 epochs over them)
    patch_train: int = 2000  # patch probe: training images (each foreground patch labelled with its image's class)
    patch_test: int = 1000  # patch probe: test images
    copies: int = 200  # copy retrieval: originals searched for (2 edited copies each per strength, 9x distractors)
    curated_size: int = 50  # retrieval study: images in the small curated set
    embedding: str = "pixels"  # retrieval study: curate.py's --checkpoint ("pixels" or a backbone checkpoint)
    num_workers: int = 1  # DataLoader workers of each training run

    def __post_init__(self):
        at_least("seeds", self.seeds, 0)
        for name in ("steps", "batch_size", "patch_train", "patch_test", "copies", "curated_size"):
            at_least(name, getattr(self, name), 1)
        for name in ("knn_train", "knn_test", "linear_train", "num_workers"):
            at_least(name, getattr(self, name), 0)


PRESETS = {
    "toy": dict(steps=3, batch_size=16, knn_train=300, knn_test=200, linear_train=300, patch_train=24,
                patch_test=24, copies=10, curated_size=20, num_workers=0),
}


# ---------------------------------------------------------------------------------------------------------------
# The studies: arms = train.Config changes on top of the tiny preset (Tab. 3 removes one component at a time)
# ---------------------------------------------------------------------------------------------------------------
Arm = namedtuple("Arm", "label changes kind equal_flops", defaults=({}, "train", False))
Study = namedtuple("Study", "question arms metrics")
STUDIES = {
    "koleo": Study("Sec. 4 / Tab. 3: what does the KoLeo regulariser (weight 0.1) add?",
                   [Arm("with KoLeo (paper)"), Arm("without KoLeo", dict(koleo_loss_weight=0.0))],
                   ("knn", "copy_map")),
    # "without iBOT" changes two things: no iBOT loss, and no masks, so the DINO loss also sees unmasked student
    # crops; the study cannot say which of the two causes a difference
    "ibot": Study("Sec. 4 / Tab. 3: what do the masked-patch (iBOT) loss and its masking add, together?",
                  [Arm("with iBOT (paper)"),
                   Arm("without iBOT (no masks)", dict(ibot_loss_weight=0.0, mask_probability=0.0))],
                  ("knn", "linear", "patch")),
    "centering": Study("Sec. 4: Sinkhorn-Knopp (SwAV) vs the EMA centering of DINO for the teacher targets",
                       [Arm("Sinkhorn-Knopp (paper)"), Arm("EMA centering", dict(centering="ema"))],
                       ("knn", "linear")),
    "heads": Study("Sec. 4: untied vs tied DINO and iBOT heads",
                   [Arm("untied heads (paper)"), Arm("tied heads", dict(ibot_separate_head=False))],
                   ("knn", "patch")),
    "multicrop": Study("App. B: are local crops worth their cost? 2 global crops only, more steps at equal FLOPs",
                       [Arm("2 global + 4 local (paper)"),
                        Arm("2 global only, equal FLOPs", dict(n_local_crops=0), equal_flops=True)],
                       ("knn",)),
    "distill": Study("Sec. 5 / Fig. 5: distilling the tiny teacher into a half-depth student vs training it",
                     [Arm("distilled (Sec. 5: no masks, no drop path)", kind="distill"),
                      # three changes: masked student crops, the iBOT loss on the masked patches only (not on
                      # every patch), stochastic depth; the study cannot say which one matters
                      Arm("distilled + masks + drop path 0.1", dict(mask_probability=0.5, drop_path_rate=0.1),
                          kind="distill"),
                      Arm("same student from scratch", dict(arch="vit_tiny_d2"))],
                     ("knn",)),
}
METRIC_NAMES = dict(knn="k-NN top-1 %", linear="linear top-1 %", patch="patch probe %",
                    copy_map="copy mAP %")


def parse_config(argv=None):
    """`python studies.py <study> --field value` -> (StudyConfig, args with .study); cli.py's convention."""
    names = sorted(STUDIES) + ["retrieval", "all"]
    positionals = [("study", "which study to run", dict(choices=names))]
    return cli.parse_config(StudyConfig, argv, presets=PRESETS, positionals=positionals, prog="studies.py",
                            description=__doc__.split("\n\n")[0])


# ---------------------------------------------------------------------------------------------------------------
# Runs: one train.Config (or DistillConfig) per arm and seed, trained once and kept
# ---------------------------------------------------------------------------------------------------------------
def run_config(scfg, arm, seed, steps=None):
    """The config of one run: the tiny preset (distill.py's for distillation) with schedules scaled to `steps`,
    then the arm's changes."""
    T = steps or scfg.steps
    scaled = dict(seed=seed, batch_size=scfg.batch_size, total_iters=T, warmup_iters=T // 10,
                  koleo_group_size=scfg.batch_size,  # as the tiny preset: the batch one process holds
                  n_local_crops=4,  # the paper's multi-crop, which the arms change (the demo preset has none)
                  num_workers=scfg.num_workers, checkpoint_every=100, log_every=20)
    if arm.kind == "distill":
        return DistillConfig(**{**DISTILL_PRESETS["tiny"], **scaled, "teacher": scfg.teacher,
                                "students": "vit_tiny_d2", **arm.changes})
    return Config(**{**TRAIN_PRESETS["tiny"], **scaled, "teacher_temp_warmup_iters": 3 * T // 10,
                     "freeze_last_layer_iters": min(50, T // 10), **arm.changes})


def step_flops(cfg):
    """FLOPs of one training step of this config, counted on fake tensors (plan.trace_step: nothing runs)."""
    return plan.trace_step(cfg, cfg.batch_size, memory=False)["flops"]


def arm_steps(scfg, arm, base):
    """Steps of an arm: scfg.steps, or as many as fit the FLOPs of scfg.steps of the base arm (equal compute)."""
    if not arm.equal_flops:
        return scfg.steps
    return round(scfg.steps * step_flops(run_config(scfg, base, 0)) / step_flops(run_config(scfg, arm, 0)))


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def run_folder(scfg, cfg):
    """<out>/runs/<hash>: the hash of everything that changes what the run learns (a retrained teacher too)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "resume", "overwrite", "num_workers",
                                                               "log_every", "checkpoint_every")}
    key["kind"] = type(cfg).__name__
    if isinstance(cfg, DistillConfig):
        key["teacher"] = file_digest(cfg.teacher)
    return os.path.join(scfg.out, "runs", hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])


def untrained(scfg, cfg):
    """The teacher backbone of this config at initialisation, saved once -> (folder, {"backbone": path}): the
    reference every table starts from (a short run's gain is measured against it)."""
    folder = run_folder(scfg, cfg) + "_init"
    path = os.path.join(folder, "teacher_backbone.pth")
    if not os.path.exists(path):
        torch.manual_seed(cfg.seed)  # as train.train builds it
        _, teacher, model_args = build_student_teacher(cfg)
        os.makedirs(folder, exist_ok=True)
        save_backbone(path, teacher.state_dict(), model_args)
    return folder, dict(backbone=path, train_s=0.0)


def trained(scfg, cfg):
    """Train one run, or reuse it -> (folder, {"backbone": path of the evaluated backbone, "train_s": seconds}).
    train.py's run is judged by its EMA teacher, distillation by the student's spare EMA (Sec. 5)."""
    folder = run_folder(scfg, cfg)
    done = os.path.join(folder, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return folder, json.load(f)
    resume = os.path.exists(os.path.join(folder, "checkpoint.pth"))  # interrupted earlier: continue it
    cfg = replace(cfg, output_dir=folder, resume=resume, overwrite=not resume)
    start = time.perf_counter()
    if isinstance(cfg, DistillConfig):
        distill(cfg)
        backbone = os.path.join(folder, f"{cfg.students}_backbone.pth")
    else:
        train(cfg)
        backbone = os.path.join(folder, "teacher_backbone.pth")
    result = dict(backbone=backbone, train_s=time.perf_counter() - start, resumed=resume)
    with open(done, "w") as f:
        json.dump(result, f)
    return folder, result


# ---------------------------------------------------------------------------------------------------------------
# Measures: eval.py's k-NN, linear probe and copy retrieval, and a probe of single patch tokens
# ---------------------------------------------------------------------------------------------------------------
def eval_config(backbone, **fields):
    """eval.py's tiny preset at the backbone's training size, with the study's sizes."""
    return ev.EvalConfig(**{**ev.PRESETS["tiny"], "image_size": ev.trained_size(backbone), **fields})


def measure(scfg, backbone, metric, device):
    """One number (%) for one metric of a frozen backbone."""
    if metric == "knn":
        cfg = eval_config(backbone, n_train=scfg.knn_train, n_test=scfg.knn_test, knn_ks=(20,))
        return ev.run_knn(backbone, cfg, device)["knn"][0]["top1"]
    if metric == "linear":
        cfg = eval_config(backbone, n_train=scfg.linear_train, n_test=scfg.knn_test)
        return ev.run_linear(backbone, cfg, device)["best"]["test_top1"]
    if metric == "copy_map":  # mean over moderate and strong edits (strength 0 is an exact copy: always found)
        cfg = eval_config(backbone, retrieval_originals=scfg.copies, retrieval_distractors=9 * scfg.copies,
                          retrieval_strengths=(0.25, 0.5))
        return 100 * float(np.mean([r["mAP"] for r in ev.run_retrieval(backbone, cfg, device)["retrieval"]]))
    if metric == "patch":
        return patch_probe(backbone, scfg.patch_train, scfg.patch_test, device)
    raise ValueError(f"unknown metric {metric}")


def measured(scfg, folder, backbone_path, metric, device):
    """measure(), cached in <folder>/measures.json under the metric and its sizes: a shared run is measured once."""
    sizes = dict(knn=(scfg.knn_train, scfg.knn_test), linear=(scfg.linear_train, scfg.knn_test),
                 copy_map=(scfg.copies,), patch=(scfg.patch_train, scfg.patch_test))[metric]
    key, path = ":".join(map(str, (metric,) + sizes)), os.path.join(folder, "measures.json")
    cache = {}
    if os.path.exists(path):
        with open(path) as f:
            cache = json.load(f)
    if key not in cache:
        cache[key] = measure(scfg, load_model(backbone_path).to(device), metric, device)
        with open(path, "w") as f:
            json.dump(cache, f, indent=1)
    return cache[key]


@torch.no_grad()
def patch_tokens(backbone, dataset, n, device, seed, batch=256):
    """Patch tokens of the foreground patches of n images (mean pixel > 0.1: Fashion-MNIST's background is 0)
    and, as each patch's label, its image's class -> (tokens [M,D], labels [M])."""
    size, p, images = ev.trained_size(backbone), backbone.patch_size, subset(dataset, n, seed)
    feats, labels = [], []
    for i in range(0, len(images), batch):
        imgs, ys = zip(*(images[j] for j in range(i, min(i + batch, len(images)))))
        x = torch.stack([eval_transform(img, size) for img in imgs]).to(device)  # [B,3,S,S]
        tokens = backbone.forward_features(x)["x_norm_patchtokens"].float().cpu()  # [B,P,D]
        pixels = torch.stack([resize(img, (size, size)).mean(0) for img in imgs])  # [B,S,S] in [0,1]
        fg = F.avg_pool2d(pixels[:, None], p).flatten(1) > 0.1  # [B,P]
        feats.append(tokens[fg])
        labels.append(torch.tensor(ys).repeat_interleave(fg.sum(1)))
    return torch.cat(feats), torch.cat(labels)


def patch_probe(backbone, n_train, n_test, device, steps=300, lr=0.01):
    """How much of its image's class one patch token holds: a linear classifier on ONE patch token predicts the
    class of the image it comes from (every foreground patch carries its image's label). Not Tab. 3's dense
    column: segmentation labels each pixel with what lies under it, and Fashion-MNIST has no such labels. The
    probe's form follows Tab. 10 (a linear layer on patch tokens); its labels do not. Full-batch Adam on
    standardised tokens -> top-1 % over the foreground patches of n_test held-out images."""
    backbone.eval()
    x, y = patch_tokens(backbone, build_dataset("fashion-mnist", train=True), n_train, device, seed=0)
    xt, yt = patch_tokens(backbone, build_dataset("fashion-mnist", train=False), n_test, device, seed=1)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    return 100 * (probe(xt).argmax(1) == yt).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------
# One study: every arm x seed trained and measured, then one table
# ---------------------------------------------------------------------------------------------------------------
def summary(values):
    """{"mean", "std" (sample std over seeds, 0 for one seed), "values"}."""
    v = np.asarray(values, dtype=float)
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, values=v.tolist())


def run_study(name, scfg, device):
    """Train and measure every arm of STUDIES[name] for every seed -> the study's JSON record (also written)."""
    study = STUDIES[name]
    if any(a.kind == "distill" for a in study.arms) and not os.path.isfile(scfg.teacher):
        raise FileNotFoundError(f"--teacher {scfg.teacher} does not exist: run `python train.py` first (it writes "
                                f"runs/tiny/checkpoint.pth), or pass a train.py checkpoint")
    rows = []
    base = next(a for a in study.arms if a.kind == "train")  # distill: the untrained network is the student
    for arm in [None] + study.arms:  # None: the untrained network, measured the same way
        steps = arm_steps(scfg, arm, study.arms[0]) if arm else 0
        if arm:
            runs = [trained(scfg, run_config(scfg, arm, seed, steps)) for seed in scfg.seeds]
        else:
            runs = [untrained(scfg, run_config(scfg, base, seed)) for seed in scfg.seeds]
        row = dict(arm=arm.label if arm else "untrained (initialisation)", steps=steps,
                   train_min=summary([r["train_s"] / 60 for _, r in runs]), runs=[folder for folder, _ in runs])
        for metric in study.metrics:
            row[metric] = summary([measured(scfg, folder, r["backbone"], metric, device) for folder, r in runs])
        rows.append(row)
    if name == "distill":
        rows.append(teacher_row(scfg, study.metrics, device))
    record = dict(study=name, question=study.question, config=asdict(scfg), rows=rows)
    print_table(record, study.metrics)
    write_json(os.path.join(scfg.out, f"{name}.json"), record)
    return record


def teacher_row(scfg, metrics, device):
    """The frozen teacher of the distill study, measured the same way (one model: no spread)."""
    teacher = load_model(scfg.teacher).to(device)
    return dict(arm="teacher (reference, 4 blocks)", steps=None, train_min=None, runs=[scfg.teacher],
                **{m: summary([measure(scfg, teacher, m, device)]) for m in metrics})


def print_table(record, metrics):
    """The study's table in Markdown (docs/studies.md pastes it as printed): mean +- sample std over the seeds."""
    n = len(record["config"]["seeds"])
    print(f"\n{record['study']}: {record['question']} (mean ± std over {n} seeds)\n")
    print("| arm | steps | train min | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |")
    print("|---" * (3 + len(metrics)) + "|")
    for r in record["rows"]:
        cells = [r["arm"], str(r["steps"] or "-"), f"{r['train_min']['mean']:.1f}" if r["train_min"] else "-"]
        cells += [f"{r[m]['mean']:.2f} ± {r[m]['std']:.2f}" for m in metrics]
        print("| " + " | ".join(cells) + " |")


def write_json(path, record):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"-> {path}")


# ---------------------------------------------------------------------------------------------------------------
# App. A.4: sample- vs cluster-based retrieval for a small, fine-grained curated set (curate.py, no training)
# ---------------------------------------------------------------------------------------------------------------
CURATED_CLASSES = {"1 class (sneaker)": (7,), "2 classes (sandal, sneaker)": (5, 7)}


def retrieval_study(scfg):
    """The pool is Fashion-MNIST's 60k training images, the curated set `curated_size` test images of one or two
    classes; curate.py's tiny preset embeds both (--embedding: standardised pixels by default) and retrieves for
    the set both ways. The sample-based mode gets k = (images the cluster mode retrieved) / (curated images), so
    both return about as many images. Measured: purity (% of retrieved images of the curated classes), modes
    covered (% of 20 k-means sub-clusters of those classes' pool images that hold a retrieved image) and spread
    (mean pairwise cosine distance of the retrieved images over that of the classes' pool images: 1 = as varied
    as the classes)."""
    ccfg = curate.CurateConfig(**{**curate.PRESETS["tiny"], "out": os.path.join(scfg.out, "curate"),
                                  "checkpoint": scfg.embedding})
    pool = embeddings.load_source("fashion-mnist", ccfg)
    test = embeddings.load_source("fashion-mnist:test", ccfg)
    pool_y = build_dataset("fashion-mnist", train=True).labels
    test_y = build_dataset("fashion-mnist", train=False).labels
    x = embeddings.rows_f32(pool.x, np.arange(len(pool.x)))  # [N,D] L2-normalised
    status, rows = np.zeros(len(x), np.int8), []
    for setting, classes in CURATED_CLASSES.items():
        in_class = np.isin(pool_y, classes)
        modes = embeddings.assign(pool.x, np.nonzero(in_class)[0],
                                  embeddings.kmeans(x[in_class], 20, ccfg), ccfg)[0]  # [n_class] sub-cluster of each
        results = {"cluster": [], "sample": []}
        for seed in scfg.seeds:
            pick = np.random.default_rng(seed).choice(np.nonzero(np.isin(test_y, classes))[0], scfg.curated_size,
                                                      replace=False)
            curated = embeddings.Source("curated", embeddings.rows_f32(test.x, np.sort(pick)), None, None)
            got = curate.retrieve(pool, status, [curated], None, replace(ccfg, retrieval="cluster", seed=seed),
                                  {})[0][0]
            k = max(1, math.ceil(len(got) / scfg.curated_size))
            results["cluster"].append(retrieval_measures(x, got, in_class, modes))
            got = curate.retrieve(pool, status, [curated], None, replace(ccfg, retrieval="sample", sample_k=k,
                                                                          seed=seed), {})[0][0]
            results["sample"].append(retrieval_measures(x, got, in_class, modes))
        for method, per_seed in results.items():
            rows.append(dict(arm=f"{setting}: {method}-based", steps=None, train_min=None, runs=[],
                             **{m: summary([r[m] for r in per_seed]) for m in RETRIEVAL_METRICS}))
    record = dict(study="retrieval", question="App. A.4: cluster- or sample-based retrieval for a small curated "
                  "set?", config=asdict(scfg), rows=rows)
    print_table(record, RETRIEVAL_METRICS)
    write_json(os.path.join(scfg.out, "retrieval.json"), record)
    return record


RETRIEVAL_METRICS = ("retrieved", "purity", "modes", "spread")
METRIC_NAMES.update(retrieved="retrieved", purity="purity %", modes="modes covered %", spread="spread")


def retrieval_measures(x, got, in_class, modes, max_pairs=2000):
    """x [N,D] L2-normalised pool embeddings, got: retrieved pool rows, in_class [N] bool, modes: sub-cluster of
    each in-class pool image (in pool order) -> the study's four numbers."""
    sub = np.flatnonzero(in_class)  # pool rows of the curated classes
    hit = np.isin(sub, got)
    rng = np.random.default_rng(0)
    spread = lambda rows: 1 - float(np.mean(x[rng.choice(rows, min(len(rows), max_pairs))] @
                                            x[rng.choice(rows, min(len(rows), max_pairs))].T))
    return dict(retrieved=len(got), purity=100 * float(in_class[got].mean()) if len(got) else 0.0,
                modes=100 * len(np.unique(modes[hit])) / len(np.unique(modes)),
                spread=spread(got) / spread(sub) if len(got) > 1 else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    scfg, args = parse_config(argv)
    print(cli.describe_overrides(scfg, args.preset, PRESETS, StudyConfig), flush=True)
    device = ev.resolve_device("auto")
    names = sorted(STUDIES) + ["retrieval"] if args.study == "all" else [args.study]
    try:
        for name in names:
            start = time.perf_counter()
            retrieval_study(scfg) if name == "retrieval" else run_study(name, scfg, device)
            print(f"{name}: {(time.perf_counter() - start) / 60:.1f} min")
    except FileNotFoundError as e:
        cli.error(str(e), "studies.py")


if __name__ == "__main__":
    main()
