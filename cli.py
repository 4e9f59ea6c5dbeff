"""The command line of train.py, probe.py and experiments.py, generated from their config dataclasses.

Every field becomes a flag (`batch_size` -> `--batch-size`) whose help is the comment on the field's line, and
a comment on lines of its own starts a group of flags, so `--help` reads as the dataclass does:

    @dataclass
    class TrainConfig:
        # Schedules (official configs/pretrain/vitl16.yaml)     <- a group: its first line is the title
        lr: float = 1e-3  # peak learning rate                   <- --lr, with that help

bool fields get --x / --no-x; `int | None` fields take an int (None stays the default). RULES tables give the
allowed values of each field, checked by check_config() before anything is built.
"""
from __future__ import annotations

import argparse
import inspect
import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path


def field_docs(cls) -> list[tuple[str, str, str]]:
    """(field name, help, group) for each field of a dataclass, read from its source comments."""
    docs, group, block = [], "", []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):  # a comment line of its own: part of the next group's heading
            block.append(text.lstrip("# "))
            continue
        found = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.*))?$", text)
        if found and found[1] in {f.name for f in fields(cls)}:
            if block:
                group, block = " ".join(block), []
            docs.append((found[1], found[2] or "", group))
    return docs


def parser_for(cls, description: str, defaults: dict | None = None,
               choices: dict | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of `cls`; `defaults` overrides the dataclass's defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    hints, defaults, choices = typing.get_type_hints(cls), defaults or {}, choices or {}
    f_default = {f.name: f.default for f in fields(cls)}
    groups = {}
    for name, help_text, group in field_docs(cls):
        if group not in groups:
            title, _, rest = group.partition(". ")
            groups[group] = p.add_argument_group(title or "options", rest or None)
        default = defaults.get(name, f_default[name])
        kind = hints[name]
        if isinstance(kind, types.UnionType):  # int | None -> int
            kind = next(k for k in kind.__args__ if k is not type(None))
        flag = "--" + name.replace("_", "-")
        shown = f"{help_text} (default: {default!r})".strip().replace("%", "%%")  # argparse %-formats help
        if kind is bool:
            groups[group].add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                       help=shown)
        else:
            groups[group].add_argument(flag, type=kind, default=default, choices=choices.get(name),
                                       help=shown, metavar=None if name in choices else kind.__name__.upper())
    return p


def parse(cls, argv: list[str] | None, description: str, defaults: dict | None = None,
          choices: dict | None = None):
    """The config the command line `argv` (None: sys.argv) asks for."""
    return cls(**vars(parser_for(cls, description, defaults, choices).parse_args(argv)))


# ----------------------------------------------------------------------------------------------------
# Rules: the allowed values of a field, as (test, what is allowed) pairs.


def one_of(*allowed):
    return (lambda v: v in allowed), "one of " + ", ".join(map(repr, allowed))


COUNT = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: 0 <= v < math.inf, ">= 0")
POSITIVE = (lambda v: 0 < v < math.inf, "> 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
FOLDER = (lambda v: not Path(v).is_file(), "a folder, not an existing file")


def check_config(cfg, rules: dict):
    """Raise ValueError naming the first flag whose value breaks its rule, and the allowed range."""
    for name, (test, allowed) in rules.items():
        value = getattr(cfg, name)
        try:
            ok = test(value)
        except TypeError:  # a string where a number belongs (from Python, not the command line)
            ok = False
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {value!r}")
