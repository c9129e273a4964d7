"""Tests for cli.py, the one command-line convention of every script: flags from dataclass fields
with help from the comment on each field's own line, strict values, presets, one-line errors with
exit status 2; and runtime.progress, the quiet progress bars in log files.

Run: python -m pytest -q tests/test_cli.py   (~10 s; the --help tests start eval.py and model.py)
"""
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from tqdm import tqdm

import cli
import runtime

ROOT = Path(__file__).resolve().parents[1]
CENTERINGS = ("sinkhorn_knopp", "ema")


@dataclass
class Config:
    # --- data and run
    data: str = "fashion-mnist"  # "fashion-mnist" or a folder; 100% read (a '#' here is no comment)
    marker: str = "# x='y'"  # a '#' inside a string default is no comment
    seed: int = 0  # model init and data order
    # --- optimisation (App. B)
    # a code comment above a field is not help
    batch_size: int = 3072  # global batch
    # a code comment below a field is not help either (measured: 42 s on some CPU)
    base_lr: float = 2e-4  # lr for a batch of 1024
    mask_ratio: tuple = (0.1, 0.5)  # iBOT masked fraction of patches
    knn_ks: tuple = (10, 20)  # neighbours voting
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | ema
    resume: bool = False  # continue from the checkpoint
    undocumented: int = 1

    def __post_init__(self):
        self.check()

    def check(self):
        cli.at_least("batch_size", self.batch_size, 1)
        cli.at_least("base_lr", self.base_lr, 0.0)
        cli.in_range("mask_ratio", self.mask_ratio, 0.0, 1.0)
        cli.has_length("mask_ratio", self.mask_ratio, 2)
        cli.increasing("mask_ratio", self.mask_ratio)
        cli.at_least("knn_ks", self.knn_ks, 1)
        cli.one_of("centering", self.centering, CENTERINGS)


@dataclass
class SubConfig(Config):
    # --- distillation (Sec. 5)
    students: tuple = ("vit_small", "vit_base")  # students trained at once
    batch_size: int = 2048  # distillation batch (Sec. 5)
    seed: int = 1


PRESETS = {"tiny": dict(data="tiny-data", batch_size=64, mask_ratio=(0.2, 0.4))}


def parse(argv, config_cls=Config, **kw):
    kw.setdefault("presets", PRESETS)
    return cli.parse_config(config_cls, argv, **kw)


def error_of(capsys, argv, **kw):
    """(exit status, stderr) of a command line that must fail."""
    with pytest.raises(SystemExit) as e:
        parse(argv, **kw)
    return e.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Help text from the dataclass source
# --------------------------------------------------------------------------------------------------
def test_help_comes_from_the_field_comments_with_defaults_types_and_sections():
    docs = cli.field_docs(Config)
    assert docs["batch_size"] == ("global batch", "optimisation (App. B)")
    assert docs["data"][0].endswith("(a '#' here is no comment)")  # a '#' inside a comment is kept
    assert docs["undocumented"] == ("", "optimisation (App. B)")
    text = " ".join(cli.build_parser(Config, PRESETS, "tiny", prog="x.py").format_help().split())
    assert "global batch (default 3072; tiny: 64; int)" in text
    assert ("iBOT masked fraction of patches (default 0.1,0.5; tiny: 0.2,0.4; comma-separated "
            "numbers)") in text
    assert "(default false; bool)" in text and "(default 10,20; comma-separated integers)" in text
    assert text.index("data and run:") < text.index("--seed") < text.index("optimisation (App. B):")


def test_only_the_comment_on_the_fields_own_line_is_help():
    """Comment lines above or below a field are code comments: reasoning and measurements stay out of --help."""
    text = " ".join(cli.build_parser(Config, PRESETS, prog="x.py").format_help().split())
    assert "code comment" not in text and "measured" not in text
    assert "--base_lr FLOAT lr for a batch of 1024 (default 0.0002; float)" in text

    @dataclass
    class Grid:
        lrs: tuple = (0.1, 0.2,  # a long default: the comment goes on its first line
                      0.5)  # not here: a comment on a continuation line is a code comment
        ks: tuple = (1,
                     2)  # nor here

    assert cli.field_docs(Grid) == {"lrs": ("a long default: the comment goes on its first line", ""),
                                    "ks": ("", "")}


def test_a_hash_inside_a_string_default_is_not_a_comment():
    assert cli.field_docs(Config)["marker"] == ("a '#' inside a string default is no comment", "data and run")
    assert parse(["--marker", "#2"])[0].marker == "#2" and parse([])[0].marker == "# x='y'"


def test_subclass_inherits_comments_and_overrides_its_own():
    docs = cli.field_docs(SubConfig)
    # a comment of its own, the parent's section
    assert docs["batch_size"] == ("distillation batch (Sec. 5)", "optimisation (App. B)")
    assert docs["seed"] == ("model init and data order", "data and run")  # no comment: the parent's
    assert docs["students"] == ("students trained at once", "distillation (Sec. 5)")
    cfg, _ = parse(["--students", "vit_large"], SubConfig, default_preset="tiny")
    assert cfg.students == ("vit_large",) and cfg.seed == 1
    assert cfg.batch_size == 64  # the tiny preset's batch


# --------------------------------------------------------------------------------------------------
# Values: strict booleans, comma-separated tuples, numbers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True),
                                         ("0", False), ("YES", True), ("no", False)])
def test_booleans_are_strict(text, value):
    assert parse(["--resume", text])[0].resume is value


def test_boolean_flag_alone_is_true_and_typos_are_errors(capsys):
    assert parse(["--resume"])[0].resume is True
    assert parse([])[0].resume is False
    status, err = error_of(capsys, ["--resume", "ture"])
    assert status == 2
    assert "--resume: 'ture' is not a boolean; allowed: true/false/1/0/yes/no" in err


def test_tuples_are_comma_separated_with_the_default_element_type():
    cfg, _ = parse(["--mask_ratio", "0.2, 0.3", "--knn_ks", "5,7,9"])
    assert cfg.mask_ratio == (0.2, 0.3) and cfg.knn_ks == (5, 7, 9)
    assert isinstance(cfg.knn_ks[0], int)


@pytest.mark.parametrize("argv, message", [
    (["--knn_ks", "10,abc"],
     "--knn_ks: '10,abc': 'abc' is not an integer; expected comma-separated integers"),
    (["--knn_ks", "10,"], "--knn_ks: '10,': expected comma-separated integers"),
    (["--batch_size", "abc"], "--batch_size: 'abc' is not an integer"),
    (["--base_lr", "fast"], "--base_lr: 'fast' is not a number"),
    (["--base_lr", "nan"], "--base_lr: nan is not allowed"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    (["--res"], "unrecognized arguments: --res"),  # no abbreviations: a typo never picks a flag
    (["--preset", "huge"], "invalid choice: 'huge'"),
])
def test_bad_values_and_unknown_flags_are_one_line_errors(capsys, argv, message):
    status, err = error_of(capsys, argv)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 2 and lines[0].startswith("usage:")  # usage + the error
    assert message in lines[1] and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# check(): ranges and choices, one line naming the flag
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size: 0 is too small; allowed: >= 1"),
    (["--base_lr", "-1"], "--base_lr: -1.0 is too small; allowed: >= 0.0"),
    (["--centering", "foo"], "--centering: foo is not allowed; allowed: sinkhorn_knopp, ema"),
    (["--mask_ratio", "0.5,0.1"], "--mask_ratio: 0.5,0.1 is not in increasing order"),
    (["--mask_ratio", "0.1,0.2,0.3"], "--mask_ratio: 0.1,0.2,0.3 has 3 values; allowed: exactly 2"),
    (["--mask_ratio", "0.1,1.5"], "--mask_ratio: 0.1,1.5 is out of range; allowed: 0.0 to 1.0"),
    (["--knn_ks", "10,0"], "--knn_ks: 10,0 is too small; allowed: >= 1"),
])
def test_check_errors_exit_2_with_one_line(capsys, argv, message):
    status, err = error_of(capsys, argv, prog="train.py")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 2 and lines[1].startswith(f"train.py: error: {message}")
    assert "Traceback" not in err


def test_a_field_type_without_a_flag_convention_is_refused_when_the_parser_is_built():
    @dataclass
    class Listy:
        sizes: list = None  # a list would otherwise be parsed as one string

    with pytest.raises(TypeError, match="field sizes is typed list"):
        cli.parse_config(Listy, [])


def test_configs_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match="--centering: foo is not allowed"):
        Config(centering="foo")


# --------------------------------------------------------------------------------------------------
# Presets and overrides
# --------------------------------------------------------------------------------------------------
def test_preset_then_flags_and_paper_means_the_defaults():
    cfg, args = parse(["--batch_size", "32"], default_preset="tiny")
    assert (args.preset, cfg.data, cfg.batch_size) == ("tiny", "tiny-data", 32)
    assert cfg.mask_ratio == (0.2, 0.4)
    assert args.overrides == {"batch_size": 32} and args.preset_given is False
    assert parse(["--preset", "tiny"], default_preset="tiny")[1].preset_given is True
    cfg, args = parse(["--preset", "paper"], default_preset="tiny")
    assert cfg == Config() and args.preset == "paper"
    cfg, args = parse([])  # no default preset: the dataclass defaults
    assert cfg == Config() and args.preset == "paper"


def test_describe_overrides_names_the_preset_and_what_differs_from_it():
    cfg, args = parse(["--batch_size", "32", "--mask_ratio", "0.2,0.4", "--data", "/x"],
                      default_preset="tiny")
    line = cli.describe_overrides(cfg, args.preset, PRESETS, Config)
    assert line == "preset tiny; overrides: data=/x, batch_size=32"  # mask_ratio is the preset's
    line = cli.describe_overrides(Config(), "paper", PRESETS, Config)
    assert line == "preset paper; no overrides"


def test_extra_flags_and_positionals():
    extra = [("bench", "time the steps"), ("steps", "how many", dict(type=int, default=5))]
    positionals = [("command", "what to run", dict(choices=("knn", "pca"))),
                   ("images", "files", dict(nargs="*"))]
    cfg, args = parse(["pca", "a.png", "b.png", "--bench", "--seed", "4"], extra_flags=extra,
                      positionals=positionals)
    assert (args.command, args.images, cfg.seed) == ("pca", ["a.png", "b.png"], 4)
    assert (args.bench, args.steps) == (True, 5)
    assert parse(["knn"], extra_flags=extra, positionals=positionals)[1].bench is False


def test_help_exits_0_and_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"], default_preset="tiny")
    out = capsys.readouterr().out
    assert e.value.code == 0
    names = ("data", "seed", "batch_size", "mask_ratio", "resume", "preset")
    assert all(f"--{name}" in out for name in names)


@pytest.mark.parametrize("script, flag", [("eval.py", "--knn_ks"), ("bench.py", "--repeats"),
                                          ("train.py", "--batch_size"), ("distill.py", "--students")])
def test_scripts_help_exits_0_with_defaults_and_types(script, flag):
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    text = " ".join(res.stdout.split())
    assert res.returncode == 0, res.stderr
    assert "(default " in text and "; int)" in text and flag in text


def test_scripts_bad_value_exits_2_without_traceback():
    res = subprocess.run([sys.executable, "eval.py", "knn", "c.pth", "--knn_ks", "10,abc"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "eval.py: error: argument --knn_ks: '10,abc': 'abc' is not an integer; "
        "expected comma-separated integers")


# --------------------------------------------------------------------------------------------------
# Progress bars
# --------------------------------------------------------------------------------------------------
def status_lines(text):
    return [chunk for chunk in text.replace("\n", "\r").split("\r") if chunk.strip()]


def test_progress_writes_a_handful_of_lines_to_a_file():
    plain, quiet = io.StringIO(), io.StringIO()
    for _ in tqdm(range(2000), file=plain, mininterval=0):  # tqdm unasked (here: no time limit)
        pass
    for _ in runtime.progress(range(2000), file=quiet, mininterval=0):  # every 10% at most
        pass
    assert len(status_lines(plain.getvalue())) > 1000
    assert 2 <= len(status_lines(quiet.getvalue())) <= 12 and "2000/2000" in quiet.getvalue()
