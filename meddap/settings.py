"""One declaration per setting.

A stage's run config is a frozen, keyword-only dataclass, and each of its
fields is declared once, with `setting(...)`: default, help text, check and
parse rule. Everything else is derived from that declaration:

    add_arguments(parser, Cls)         argparse flags: --max-steps, choices, defaults in --help
    add_command(sub, "name", Cls, fn)  a sub-command with those flags and its handler
    from_args(Cls, args)               a checked config from parsed flags
    from_table(Cls, table, "lora")     a checked config from a TOML section
    validate(cfg, label)               the field checks, then the class's `cross_checks`
    as_dict(cfg)                       JSON-ready values (enums by value, tuples as lists)

Errors name the setting as the user wrote it: `--max-steps -1 ...` on the
command line, `[lora] max_steps = -1 ...` in a config file. A check is a
function `value -> None | complaint`, where the complaint finishes the
sentence "NAME = VALUE ...", e.g. "must be at least 1".
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from meddap.errors import MeddapError

Check = Callable[[Any], "str | None"]
Label = Callable[[str], str]


def setting(default=dataclasses.MISSING, *, help: str = "", check: Check | None = None,
            parse: Callable[[Any], Any] | None = None, flag: str | None = None,
            nargs: str | None = None, positional: bool = False, cli: bool = True,
            toml: bool = True):
    """A dataclass field with its help text, check and parse rule.

    parse: turns what the user typed (a CLI string, a TOML value) into the
    field's value, for types the generic conversion does not cover.
    flag: the CLI flag when it is not --field-name. nargs: argparse's, for tuples
    ("+" by default; "append" repeats the flag). cli / toml: whether the
    field is offered there (a field the pipeline fills itself is not a key).
    """
    meta = {"help": help, "check": check, "parse": parse, "flag": flag, "nargs": nargs,
            "positional": positional, "cli": cli, "toml": toml}
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------- checks

def at_least(low) -> Check:
    return lambda v: None if v >= low else f"must be at least {low}"


def above(low) -> Check:
    return lambda v: None if (math.isfinite(v) and v > low) else f"must be a finite number above {low}"


def in_range(low, high, what: str = "") -> Check:
    return lambda v: None if low <= v <= high else f"is out of range; use a value from {low} to {high}{what}"


def finite() -> Check:
    return lambda v: None if math.isfinite(v) else "is not a finite number"


def multiple_of(n: int, why: str) -> Check:
    return lambda v: None if (v >= n and v % n == 0) else f"must be a positive multiple of {n} ({why})"


def all_of(*checks: Check) -> Check:
    def check(v):
        for c in checks:
            complaint = c(v)
            if complaint:
                return complaint
        return None
    return check


def nonempty_each(item: Check, example: str) -> Check:
    """For tuples: not empty, and every entry passes `item`."""
    def check(v):
        if not v:
            return f"must not be empty; e.g. {example}"
        for x in v:
            complaint = item(x)
            if complaint:
                return f"has the entry {_show(x)}, which {complaint}; e.g. {example}"
        return None
    return check


# ---------------------------------------------------------------- names, types and values

def cli_label(name: str) -> str:
    return "--" + name.replace("_", "-")


def toml_label(section: str) -> Label:
    return lambda name: f"[{section}] {name}"


def _show(value) -> str:
    if isinstance(value, Enum):
        return repr(value.value)
    if isinstance(value, tuple):
        return repr([_show_raw(v) for v in value])
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, (str, Path)) else str(value)


def _show_raw(v):
    return v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v


def _unwrap_optional(tp):
    """(T, True) for `T | None`, else (tp, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            inner = args[0] if len(args) == 1 else typing.Union[tuple(args)]
            return inner, True
    return tp, False


# type -> (what it accepts, what it must be, conversion); bool is not a number here.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "must be true or false", bool),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be a whole number", int),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "must be a number", float),
    str: (lambda v: isinstance(v, str), "must be a string", str),
    Path: (lambda v: isinstance(v, (str, Path)), "must be a path (a string)", Path),
}


def coerce(value, tp, name: str, parse=None):
    """What the user gave -> a value of type `tp`, or a MeddapError naming `name`."""
    if parse is not None:
        return parse(value)
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise MeddapError(f"{name} is required.")
    if isinstance(tp, type) and issubclass(tp, Enum):
        if isinstance(value, tp):
            return value
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise MeddapError(f"{name} = {value!r} is not allowed; choose one of "
                              f"{', '.join(map(repr, allowed))}.")
        return tp(value)
    if tp in _SCALARS:
        accepts, must, convert = _SCALARS[tp]
        if not accepts(value):
            raise MeddapError(f"{name} = {value!r} {must}.")
        return convert(value)
    origin = typing.get_origin(tp)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise MeddapError(f"{name} = {value!r} must be a list.")
        return tuple(coerce(v, item, name) for v in value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise MeddapError(f"{name} = {value!r} must be a table, e.g. {{benign = 10, malignant = 10}}.")
        return dict(value)
    raise TypeError(f"settings: no conversion for {name} of type {tp!r}")   # a bug in a declaration


def _fields(cls, where: str):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get(where, True)]


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ---------------------------------------------------------------- checking

def validate(cfg, label: Label = cli_label):
    """Run every field's check, then `cfg.cross_checks(label)` when the class has it."""
    for f in dataclasses.fields(cfg):
        check = f.metadata.get("check")
        value = getattr(cfg, f.name)
        if check is None or value is None:
            continue
        complaint = check(value)
        if complaint:
            raise MeddapError(f"{label(f.name)} = {_show(value)} {complaint}.")
    cross = getattr(cfg, "cross_checks", None)
    if cross is not None:
        cross(label)
    return cfg


def as_dict(cfg) -> dict:
    """JSON-ready values of a config: enums by value, tuples as lists, paths as strings."""
    def plain(v):
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# ---------------------------------------------------------------- argparse

def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` (fields with cli=False or in `skip` are left out)."""
    for f, tp in _fields(cls, "cli"):
        if f.name in skip:
            continue
        m = f.metadata
        default = default_of(f)
        inner, _ = _unwrap_optional(tp)
        kw: dict[str, Any] = {"help": m.get("help", "")}
        if default is not dataclasses.MISSING:
            shown = _show_raw(default) if not isinstance(default, tuple) else \
                ",".join(str(_show_raw(v)) for v in default)
            kw["default"] = default
            if default is not None and shown != "":          # None / () are explained by the help text
                kw["help"] += f" (default: {shown})".replace("%", "%%")
        names = [f.name] if m.get("positional") else [m.get("flag") or cli_label(f.name)]
        if not m.get("positional"):
            kw["dest"] = f.name
            if default is dataclasses.MISSING:
                kw["required"] = True
        if inner is bool:
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif m.get("parse") is not None:
            kw["type"] = str
            if m.get("nargs"):
                kw["nargs"] = m["nargs"]
        elif isinstance(inner, type) and issubclass(inner, Enum):
            kw["choices"] = [e.value for e in inner]
            kw["type"] = str
        elif typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0]
            kw["type"] = item if item in (int, float, str) else str
            if m.get("nargs") == "append":
                kw["action"] = "append"
                kw.pop("default", None) if default is dataclasses.MISSING else None
            else:
                kw["nargs"] = m.get("nargs") or "+"
        elif inner in (int, float, str):
            kw["type"] = inner
        elif inner is Path:
            kw["type"] = Path
        kw["help"] = kw["help"].strip()
        if kw.get("action") in ("store_true",) or kw.get("action") is argparse.BooleanOptionalAction:
            kw.pop("type", None)
        parser.add_argument(*names, **kw)


def add_command(subparsers, name: str, cls, func, **parser_kw) -> argparse.ArgumentParser:
    """The sub-command `name` (every `meddap` command that runs a config is made here):
    its parser (`parser_kw`: help, description, ...), one flag per field of `cls`, and
    `func(args)` as its handler. The caller adds the flags that are not settings of the
    run (--json, --force, --quiet, positional inputs)."""
    p = subparsers.add_parser(name, **parser_kw)
    add_arguments(p, cls)
    p.set_defaults(func=func)
    return p


def from_args(cls, args: argparse.Namespace, **fixed):
    """A checked `cls` from parsed flags (fields not on the CLI take `fixed` or their default)."""
    kwargs = {}
    for f, tp in _fields(cls, "__all__"):
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif f.metadata.get("cli", True) and hasattr(args, f.name):
            raw = getattr(args, f.name)
            if raw is default_of(f) and not isinstance(raw, (list, str)):
                kwargs[f.name] = raw                       # untouched default, already typed
            else:
                kwargs[f.name] = coerce(raw, tp, cli_label(f.name), f.metadata.get("parse"))
        else:
            default = default_of(f)
            if default is not dataclasses.MISSING:
                kwargs[f.name] = default
    return validate(cls(**kwargs), cli_label)


def from_table(cls, table: dict, section: str, source: str = "", defaults: dict | None = None, **fixed):
    """A checked `cls` from one TOML section. `fixed`: fields the caller fills itself
    (not keys). A key not in the table takes `defaults[key]` when given (a section
    whose default differs from the command's, said where it is given), else its
    declared default (read from the declaration, so a changed default shows here too)."""
    defaults = defaults or {}
    where = f"{source}: " if source else ""
    keys = {f.name: (f, tp) for f, tp in _fields(cls, "toml") if f.name not in fixed}
    for key in table:
        if key not in keys:
            raise MeddapError(f"{where}unknown key [{section}] {key}; the keys of [{section}] are "
                              f"{', '.join(keys)}.")
    kwargs = dict(fixed)
    for name, (f, tp) in keys.items():
        if name in table:
            kwargs[name] = coerce(table[name], tp, f"[{section}] {name}", f.metadata.get("parse"))
        elif name in defaults:
            kwargs[name] = defaults[name]
        else:
            default = default_of(f)
            if default is dataclasses.MISSING:
                raise MeddapError(f"{where}[{section}] {name} is required.")
            kwargs[name] = default
    for f in dataclasses.fields(cls):             # fields that are neither keys nor fixed
        if f.name not in kwargs:
            default = default_of(f)
            if default is not dataclasses.MISSING:
                kwargs[f.name] = default
    return validate(cls(**kwargs), toml_label(section))
