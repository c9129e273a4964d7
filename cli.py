"""One command-line convention for every script: config fields -> flags, presets, checks, errors.

Each script keeps its hyperparameters in one dataclass; parse_config turns it into the command line:

    --name VALUE     one flag per field; help = its comment, default, preset values and type
    --flag 0.1,0.5   tuples are comma-separated, element type from the default
    --resume         booleans: true/false/1/0/yes/no (any case); the flag alone means true
    --preset NAME    named overrides of the defaults (the dict PRESETS beside each config);
                     "paper" = none, the dataclass defaults

Help: a field's help is the trailing comment on the field's own (first) line, `name: type = default
# help`; a '#' inside a quoted default is not a comment. Comment lines above or below a field are code
comments, never help: --help says what a flag does and its unit, the reasoning stays in the code.
Flags are grouped under the `# --- section` line above them; a subclass's comment on a field it
overrides replaces its parent's.

Precedence: dataclass defaults (the paper's), then the preset, then the flags given. A config checks
itself in __post_init__ with one_of / at_least / in_range / has_length / increasing (a ValueError
naming the flag). An unknown flag, an unparsable value or one that check() refuses ends in a short
usage line and "<script>: error: --flag: what is wrong; allowed: ...", exit status 2, no traceback.

    cfg, args = parse_config(Config, presets=PRESETS, default_preset="tiny", description=__doc__)
    print(describe_overrides(cfg, args.preset, PRESETS, Config))  # preset tiny; overrides: seed=1
"""
import argparse
import dataclasses
import functools
import inspect
import math
import re
import shutil
import sys
import textwrap

KINDS = ("bool", "int", "float", "str", "tuple")  # field types a flag can have
KIND_WORDS = {"int": "integers", "float": "numbers", "str": "strings"}
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
SECTION_LINE = re.compile(r"\s*#\s*---(.*)")
# `name: type = default  # help`; a quoted string is skipped whole, so a '#' inside it is no comment
FIELD_LINE = re.compile(r"""\s*(\w+)\s*:[^=#]*=(?:"[^"]*"|'[^']*'|[^"'#])*(?:#(.*))?$""")


# --------------------------------------------------------------------------------------------------
# Help text: each field's trailing comment and the `# --- section` above it
# --------------------------------------------------------------------------------------------------
def field_docs(config_cls):
    """{field name: (help, section)} from the source of config_cls and of the dataclasses it inherits
    from, base classes first: a subclass's comment on a field it overrides wins; the field keeps its
    parent's section (and place)."""
    docs = {}
    for cls in [c for c in reversed(config_cls.__mro__) if dataclasses.is_dataclass(c)]:
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):  # defined in an interactive session: no source, no help
            continue
        names, section = {f.name for f in dataclasses.fields(cls)}, ""
        for line in lines:
            if title := SECTION_LINE.match(line):
                section = title.group(1).strip("- ")
            elif (field := FIELD_LINE.match(line)) and field.group(1) in names:
                text, parent = (field.group(2) or "").strip(), docs.get(field.group(1))
                docs[field.group(1)] = (text or parent[0], parent[1]) if parent else (text, section)
    return docs


# --------------------------------------------------------------------------------------------------
# Flags: strict values, a value as it is written on the command line, the parser
# --------------------------------------------------------------------------------------------------
def element_kind(default):
    """Element type of a tuple field, read off its default: "int", "float" or "str"."""
    if not default or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
        return "str"
    return "int" if all(isinstance(v, int) for v in default) else "float"


def parse_value(kind, text):
    """One value, strictly: "ture", "1.5" for an integer or "nan" is an error, not a surprise."""
    if kind == "bool":
        if text.strip().lower() not in BOOLEAN_WORDS:
            raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; allowed: true/false/1/0/yes/no")
        return BOOLEAN_WORDS[text.strip().lower()]
    try:
        value = int(text) if kind == "int" else float(text) if kind == "float" else text
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "float" and math.isnan(value):  # nan would pass every range check (all comparisons are False)
        raise argparse.ArgumentTypeError("nan is not allowed")
    return value


def parse_tuple(kind, text):
    """"10,20,100" -> (10, 20, 100); spaces around commas allowed; an empty element is an error."""
    expected = f"expected comma-separated {KIND_WORDS[kind]}"
    parts = [p.strip() for p in text.split(",")]
    if kind == "str" and not text.strip():
        return ()  # an empty list of names (e.g. no extra evaluation sets)
    if "" in parts:
        raise argparse.ArgumentTypeError(f"{text!r}: {expected}, e.g. 1,2")
    try:
        return tuple(parse_value(kind, p) for p in parts)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; {expected}") from None


def show(value):
    """A value as it is written on the command line: tuples comma-separated, booleans lower case."""
    if isinstance(value, tuple):
        return ",".join(map(show, value))
    return str(value).lower() if isinstance(value, bool) else str(value) if value != "" else '""'


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, 100 columns wide when not a terminal, never breaking fashion-mnist or comma-separated."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=shutil.get_terminal_size((102, 24)).columns - 2)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def field_flag(field, comment, presets):
    """argparse keywords of one field's flag; its default None means "not given"."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "?")  # str: __future__
    if kind not in KINDS:  # a list or Optional field would otherwise be parsed as text, silently
        raise TypeError(f"cli: field {field.name} is typed {kind}; a flag needs one of {KINDS}")
    default = None if field.default is dataclasses.MISSING else field.default
    shown = [f"default {show(default)}"]
    shown += [f"{name}: {show(values[field.name])}" for name, values in presets.items() if field.name in values]
    if kind == "tuple":
        shown.append(f"comma-separated {KIND_WORDS[element_kind(default)]}")
        flag = dict(type=functools.partial(parse_tuple, element_kind(default)), metavar="A,B")
    else:
        shown.append(kind)
        flag = dict(type=functools.partial(parse_value, kind), metavar=kind.upper())
    if kind == "bool":
        flag.update(nargs="?", const=True)  # the flag alone means true
    help_text = f"{comment} ({'; '.join(shown)})".strip().replace("%", "%%")  # % is argparse's placeholder
    return dict(flag, default=None, help=help_text)


def build_parser(config_cls, presets=None, default_preset=None, description="", extra_flags=None,
                 positionals=None, prog=None):
    """One flag per field (grouped by section), --preset, the extra flags and the positionals."""
    presets, extra_flags, positionals = presets or {}, extra_flags or (), positionals or ()
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    words = [parser.prog, *(name.upper() for name, *_ in positionals)]
    words += (["[--preset NAME]"] if presets else []) + [f"[--{name}]" for name, *_ in extra_flags]
    # one usage line instead of argparse's 30 for 60 fields, so that an error reads as 2 lines
    parser.usage = " ".join(words + ["[--<field> VALUE ...]  (--help lists the fields)"])
    for name, help_text, *kwargs in positionals:
        parser.add_argument(name, help=help_text, **(kwargs[0] if kwargs else {}))
    if presets:
        parser.add_argument("--preset", choices=["paper", *presets], help=(
            "named overrides of the defaults, applied before the flags given here; "
            f"'paper' = the dataclass defaults (default: {default_preset or 'paper'})"))
    for name, help_text, *kwargs in extra_flags:  # (name, help) alone is a switch
        parser.add_argument(f"--{name}", help=help_text, **(kwargs[0] if kwargs else dict(action="store_true")))
    docs, groups = field_docs(config_cls), {}
    for field in dataclasses.fields(config_cls):
        comment, section = docs.get(field.name, ("", ""))
        if section not in groups:
            groups[section] = parser.add_argument_group(section or config_cls.__name__)
        groups[section].add_argument(f"--{field.name}", **field_flag(field, comment, presets))
    return parser


def parse_config(config_cls, argv=None, presets=None, default_preset=None, description="",
                 extra_flags=None, positionals=None, prog=None):
    """Command line -> (cfg, args): cfg = config_cls(defaults, then presets[args.preset], then the flags
    given); args has .preset ("paper" = none), .preset_given (False when default_preset applied),
    .overrides ({field: value} of the flags given), each extra flag and each positional.
    extra_flags / positionals: (name, help) or (name, help, argparse kwargs); (name, help) alone is a switch."""
    parser = build_parser(config_cls, presets, default_preset, description, extra_flags, positionals, prog)
    args = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(config_cls)]
    args.overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    args.preset_given = getattr(args, "preset", None) is not None
    args.preset = getattr(args, "preset", None) or default_preset or "paper"
    try:
        cfg = config_cls(**{**(presets or {}).get(args.preset, {}), **args.overrides})
    except ValueError as e:  # a check() refused a value: one line, exit 2, no traceback
        parser.error(str(e))
    return cfg, args


def describe_overrides(cfg, preset_name, presets, config_cls):
    """One line for the start of a run: the preset and every field that differs from what it
    sets, e.g. "preset tiny; overrides: arch=vit_small, data=/x"."""
    base = config_cls(**(presets or {}).get(preset_name, {}))
    changed = [f"{f.name}={show(getattr(cfg, f.name))}" for f in dataclasses.fields(config_cls)
               if getattr(cfg, f.name) != getattr(base, f.name)]
    return f"preset {preset_name or 'paper'}; " + (f"overrides: {', '.join(changed)}" if changed else "no overrides")


def error(message, prog=None, status=2):
    """A one-line error found after parsing (a checkpoint that is not a backbone, a read-only
    folder) in argparse's format "<script>: error: <message>"; exit status 2 as for a bad flag."""
    print(f"{prog or sys.argv[0].rsplit('/', 1)[-1] or 'python'}: error: {message}", file=sys.stderr)
    raise SystemExit(status)


# --------------------------------------------------------------------------------------------------
# Checks: one line per field in a config's check(); ValueError("--name: what; allowed: ...")
# --------------------------------------------------------------------------------------------------
def one_of(name, value, choices):
    if value not in choices:
        raise ValueError(f"--{name}: {show(value)} is not allowed; allowed: {', '.join(map(show, choices))}")


def at_least(name, value, low):
    """value >= low; for a tuple, every element."""
    if not all(v >= low for v in (value if isinstance(value, tuple) else (value,))):
        raise ValueError(f"--{name}: {show(value)} is too small; allowed: >= {show(low)}")


def in_range(name, value, low, high):
    """low <= value <= high; for a tuple, every element."""
    if not all(low <= v <= high for v in (value if isinstance(value, tuple) else (value,))):
        raise ValueError(f"--{name}: {show(value)} is out of range; allowed: {show(low)} to {show(high)}")


def has_length(name, value, n):
    if len(value) != n:
        raise ValueError(f"--{name}: {show(value)} has {len(value)} values; allowed: exactly {n}, comma-separated")


def increasing(name, value):
    """A (low, high) range: low <= high."""
    if list(value) != sorted(value):
        raise ValueError(f"--{name}: {show(value)} is not in increasing order; allowed: low,high with low <= high")
