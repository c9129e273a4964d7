"""One command-line convention for every script: config fields -> flags, presets, checks, progress.

Each script (train.py, distill.py, eval.py, curate.py, model.py) keeps its hyperparameters in one
dataclass whose fields carry a trailing comment (meaning, unit, paper source), grouped by
`# --- section` comment lines. parse_config turns that dataclass into the command line:

    --name VALUE     one flag per field; help = its comment, default, preset values and type
    --flag 0.1,0.5   tuples are comma-separated, element type from the default
    --resume         booleans: true/false/1/0/yes/no (any case); the flag alone means true
    --preset NAME    named overrides of the defaults (the dict PRESETS beside each config);
                     "paper" = none, the dataclass defaults

Precedence: dataclass defaults (the paper's), then the preset, then the flags given. Unknown flags,
unparsable values and values a config's check() refuses end in a short usage line, one line
"<script>: error: --flag: what is wrong; allowed: ...", and exit status 2, never a traceback.

A config validates itself: its __post_init__ calls check(), one line per field with the helpers
one_of / at_least / in_range / has_length / increasing (each raises ValueError naming the flag), so
the same rules hold for configs built in code and in tests.

    cfg, args = parse_config(Config, presets=PRESETS, default_preset="tiny", description=__doc__)
    print(describe_overrides(cfg, args.preset, PRESETS, Config))  # preset tiny; overrides: seed=1
"""
import argparse
import ast
import dataclasses
import inspect
import io
import math
import shutil
import sys
import textwrap
import tokenize


KINDS = ("bool", "int", "float", "str", "tuple")  # field types a flag can have
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# --------------------------------------------------------------------------------------------------
# Reading the dataclass: each field's trailing comment and the `# --- section` it sits in
# --------------------------------------------------------------------------------------------------
def field_docs(config_cls):
    """{field name: (comment, section)} read from the source of config_cls and of every dataclass
    it inherits from, base classes first: a subclass's comment on a field it overrides replaces its
    parent's."""
    docs = {}
    for cls in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(cls):
            for name, (comment, section) in _class_field_docs(cls).items():
                if name in docs:  # an override keeps its parent's place, so its parent's section
                    comment, section = comment or docs[name][0], docs[name][1]
                docs[name] = (comment, section)
    return docs


def _class_field_docs(cls):
    """Fields are found with ast (the annotated assignments of the class body), comments with
    tokenize, so that a '#' inside a string default is not taken for a comment. A field's comment
    may go on in comment-only lines right below it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined in an interactive session: no source, no help text
        return {}
    comments = {}  # line number -> (comment text, whether the comment is alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = tok.line.strip() == tok.string.strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    class_node = ast.parse(source).body[0]
    section_lines = sorted((line, text.strip("- ").strip())
                           for line, (text, alone) in comments.items()
                           if alone and text.startswith("---"))
    docs = {}
    for node in class_node.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text, alone = comments.get(node.end_lineno, ("", True))
            text = "" if alone else text
            row = node.end_lineno + 1  # comment-only lines right below a comment continue it
            while text and _continues(comments.get(row)):
                text, row = f"{text} {comments[row][0]}", row + 1
            above = [title for start, title in section_lines if start < node.lineno]
            section = above[-1] if above else ""
            docs[node.target.id] = (text, section)
    return docs


def _continues(comment):
    """A comment alone on its line that is not a section title: it goes on with the one above."""
    return comment is not None and comment[1] and not comment[0].startswith("---")


# --------------------------------------------------------------------------------------------------
# Values: strict parsing of one flag's text, and the text shown in help and in describe_overrides
# --------------------------------------------------------------------------------------------------
def kind_of(field):
    """"bool", "int", "float", "str" or "tuple" (annotations are strings under
    `from __future__ import annotations`)."""
    t = field.type
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    if name not in KINDS:  # a list or Optional field would otherwise be parsed as text, silently
        raise TypeError(f"cli: field {field.name} is typed {name}; a flag needs one of {KINDS}")
    return name


def element_kind(default):
    """Element type of a tuple field, read off its default: ints, floats (any float) or strings."""
    if default and all(isinstance(v, int) and not isinstance(v, bool) for v in default):
        return "int"
    if default and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
        return "float"
    return "str"


def parse_bool(text):
    value = BOOLEAN_WORDS.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; "
                                         f"allowed: true/false/1/0/yes/no")
    return value


def parse_int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def parse_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value):  # nan would pass every range check (all comparisons are False)
        raise argparse.ArgumentTypeError("nan is not allowed")
    return value


PARSERS = {"bool": parse_bool, "int": parse_int, "float": parse_float, "str": str}
KIND_WORDS = {"int": "integers", "float": "numbers", "str": "strings"}


def tuple_parser(kind):
    """"10,20,100" -> (10, 20, 100); spaces around commas allowed; an empty element is an error."""
    expected = f"expected comma-separated {KIND_WORDS[kind]}"

    def parse(text):
        parts = [p.strip() for p in text.split(",")]
        if kind == "str" and not text.strip():
            return ()  # an empty list of names (e.g. no extra evaluation sets)
        if any(p == "" for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}, e.g. 1,2")
        try:
            return tuple(PARSERS[kind](p) for p in parts)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}; {expected}") from None
    return parse


def show(value):
    """A value as it is written on the command line: tuples comma-separated, booleans lower case."""
    if isinstance(value, tuple):
        return ",".join(show(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------
def build_parser(config_cls, presets=None, default_preset=None, description="", extra_flags=None,
                 positionals=None, prog=None):
    """argparse parser with one flag per field (grouped by section, help from the comments),
    --preset, the extra mode switches and the positional arguments. Every field flag defaults to
    None, which means "not given"."""
    presets = presets or {}
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    parser.usage = short_usage(parser.prog, presets, extra_flags, positionals)
    for name, help_text, kwargs in _normalise(positionals or (), positional=True):
        parser.add_argument(name, help=help_text, **kwargs)
    if presets:
        names = ["paper", *presets]
        start = default_preset or "paper"
        parser.add_argument("--preset", choices=names, default=None, help=(
            f"named overrides of the defaults, applied before the flags given here; "
            f"'paper' = the dataclass defaults (default: {start})"))
    for name, help_text, kwargs in _normalise(extra_flags or (), positional=False):
        parser.add_argument(f"--{name}", help=help_text, **kwargs)
    docs, groups = field_docs(config_cls), {}
    for field in dataclasses.fields(config_cls):
        comment, section = docs.get(field.name, ("", ""))
        if section not in groups:
            groups[section] = parser.add_argument_group(section or config_cls.__name__)
        kind, default = kind_of(field), _default(field)
        shown = [f"default {show(default)}"]
        shown += [f"{p}: {show(values[field.name])}" for p, values in presets.items()
                  if field.name in values]
        if kind == "tuple":
            shown.append(f"comma-separated {KIND_WORDS[element_kind(default)]}")
        else:
            shown.append(kind)
        help_text = f"{comment} ({'; '.join(shown)})".strip().replace("%", "%%")  # % is argparse's
        kwargs = dict(default=None, help=help_text, metavar=kind.upper())
        if kind == "bool":
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif kind == "tuple":
            kwargs.update(type=tuple_parser(element_kind(default)), metavar="A,B")
        else:
            kwargs.update(type=PARSERS[kind])
        groups[section].add_argument(f"--{field.name}", **kwargs)
    return parser


def short_usage(prog, presets, extra_flags, positionals):
    """One usage line instead of argparse's 30 for 60 fields, so that an error reads as 2 lines."""
    words = [prog, *(name.upper() for name, *_ in positionals or ())]
    words += ["[--preset NAME]"] if presets else []
    words += [f"[--{name}]" for name, *_ in extra_flags or ()]
    return " ".join(words + ["[--<field> VALUE ...]  (--help lists the fields)"])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, 100 columns wide when the output is not a terminal (argparse: 80), and never
    breaking a line inside fashion-mnist or comma-separated."""

    def __init__(self, prog):
        width = shutil.get_terminal_size((102, 24)).columns - 2
        super().__init__(prog, max_help_position=30, width=width)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _normalise(entries, positional):
    """(name, help) or (name, help, argparse kwargs) -> (name, help, kwargs); an extra flag given
    without kwargs is a switch (store_true)."""
    for entry in entries:
        name, help_text, *rest = entry
        kwargs = dict(rest[0]) if rest else ({} if positional else dict(action="store_true"))
        yield name, help_text, kwargs


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def parse_config(config_cls, argv=None, presets=None, default_preset=None, description="",
                 extra_flags=None, positionals=None, prog=None):
    """Command line -> (cfg, args).

    cfg = config_cls(defaults, then presets[args.preset], then the flags given). args has .preset
    (the preset used; "paper" = none), .preset_given (False when default_preset applied because
    --preset was not given), .overrides ({field: value} of the flags given), each extra
    flag and each positional. extra_flags / positionals: (name, help) or (name, help, argparse
    kwargs); an extra flag given as (name, help) is a switch (store_true). Errors exit with
    status 2, argparse's way."""
    presets = presets or {}
    parser = build_parser(config_cls, presets, default_preset, description, extra_flags,
                          positionals, prog)
    args = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(config_cls)]
    args.overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    args.preset_given = getattr(args, "preset", None) is not None
    args.preset = getattr(args, "preset", None) or default_preset or "paper"
    values = {**presets.get(args.preset, {}), **args.overrides}
    try:
        cfg = config_cls(**values)
    except ValueError as e:  # a check() refused a value: one line, exit 2, no traceback
        parser.error(str(e))
    return cfg, args


def describe_overrides(cfg, preset_name, presets, config_cls):
    """One line for the start of a run: the preset and every field that differs from what it
    sets, e.g. "preset tiny; overrides: arch=vit_small, data=/x"."""
    base = config_cls(**(presets or {}).get(preset_name, {}))
    changed = [f"{f.name}={show(getattr(cfg, f.name))}" for f in dataclasses.fields(config_cls)
               if getattr(cfg, f.name) != getattr(base, f.name)]
    what = f"overrides: {', '.join(changed)}" if changed else "no overrides"
    return f"preset {preset_name or 'paper'}; {what}"


def error(message, prog=None, status=2):
    """A one-line error found after parsing (a checkpoint that is not a backbone, a read-only
    folder) in argparse's format "<script>: error: <message>"; exit status 2 as for a bad flag."""
    prog = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "python")
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


# --------------------------------------------------------------------------------------------------
# Checks: one line per field in a config's check(); ValueError("--name: what; allowed: ...")
# --------------------------------------------------------------------------------------------------
def one_of(name, value, choices):
    if value not in choices:
        allowed = ", ".join(map(show, choices))
        raise ValueError(f"--{name}: {show(value)} is not allowed; allowed: {allowed}")


def at_least(name, value, low):
    """value >= low; for a tuple, every element."""
    for v in (value if isinstance(value, tuple) else (value,)):
        if not v >= low:
            raise ValueError(f"--{name}: {show(value)} is too small; allowed: >= {show(low)}")


def in_range(name, value, low, high):
    """low <= value <= high; for a tuple, every element."""
    for v in (value if isinstance(value, tuple) else (value,)):
        if not low <= v <= high:
            raise ValueError(f"--{name}: {show(value)} is out of range; "
                             f"allowed: {show(low)} to {show(high)}")


def has_length(name, value, n):
    if len(value) != n:
        raise ValueError(f"--{name}: {show(value)} has {len(value)} values; allowed: exactly {n}, "
                         f"comma-separated")


def increasing(name, value):
    """A (low, high) range: low <= high."""
    if list(value) != sorted(value):
        raise ValueError(f"--{name}: {show(value)} is not in increasing order; "
                         f"allowed: low,high with low <= high")
