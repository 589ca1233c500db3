"""meddap.settings: a field declared once gives the CLI flag, the TOML key and the check,
and errors name the setting as the user wrote it."""
import argparse
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import pytest

from meddap.errors import MeddapError
from meddap.settings import (add_arguments, as_dict, at_least, from_args, from_table, in_range,
                             nonempty_each, above, setting)


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, kw_only=True)
class Demo:
    out: str = setting(help="output folder")
    steps: int = setting(30, check=in_range(1, 1000), help="sampling steps")
    scale: float = setting(7.5, check=above(0), help="guidance")
    colour: Colour = setting(Colour.RED, help="a colour")
    ratios: tuple[float, ...] = setting((0.5, 1.0), check=nonempty_each(above(0), "[0.5, 1.0]"),
                                        help="ratios")
    limit: int | None = setting(None, check=at_least(1), help="optional cap")
    fast: bool = setting(False, help="go fast")
    path: Path = setting(Path("weights"), help="a folder")

    def cross_checks(self, label):
        if self.limit is not None and self.limit > self.steps:
            raise MeddapError(f"{label('limit')} {self.limit} exceeds {label('steps')} {self.steps}.")


def parser():
    p = argparse.ArgumentParser(prog="demo")
    add_arguments(p, Demo)
    return p


def test_cli_flags_defaults_and_types():
    cfg = from_args(Demo, parser().parse_args(["--out", "o", "--steps", "5", "--colour", "blue",
                                               "--ratios", "1", "2", "--limit", "3", "--fast"]))
    assert cfg == Demo(out="o", steps=5, colour=Colour.BLUE, ratios=(1.0, 2.0), limit=3, fast=True)
    d = from_args(Demo, parser().parse_args(["--out", "o"]))
    assert d == Demo(out="o") and d.path == Path("weights") and d.limit is None
    help_text = parser().format_help()
    assert "(default: 30)" in help_text and "(default: red)" in help_text and "{red,blue}" in help_text
    assert "(default: 0.5,1.0)" in help_text


def test_cli_errors_name_the_flag():
    with pytest.raises(MeddapError, match=r"^--steps = 0 is out of range; use a value from 1 to 1000\.$"):
        from_args(Demo, parser().parse_args(["--out", "o", "--steps", "0"]))
    with pytest.raises(MeddapError, match=r"--scale = nan must be a finite number above 0"):
        from_args(Demo, parser().parse_args(["--out", "o", "--scale", "nan"]))
    with pytest.raises(MeddapError, match=r"--ratios = \[0.5, -1.0\] has the entry -1"):
        from_args(Demo, parser().parse_args(["--out", "o", "--ratios", "0.5", "-1"]))
    with pytest.raises(MeddapError, match=r"^--limit 40 exceeds --steps 30\.$"):
        from_args(Demo, parser().parse_args(["--out", "o", "--limit", "40"]))


def test_toml_keys_types_and_errors_name_the_key():
    cfg = from_table(Demo, {"steps": 5, "colour": "blue", "ratios": [2], "path": "w"}, "demo", out="o")
    assert cfg == Demo(out="o", steps=5, colour=Colour.BLUE, ratios=(2.0,), path=Path("w"))
    for table, words in [({"steps": "five"}, "[demo] steps = 'five' must be a whole number."),
                         ({"steps": 0}, "[demo] steps = 0 is out of range"),
                         ({"colour": "green"}, "[demo] colour = 'green' is not allowed; choose one of 'red', 'blue'."),
                         ({"fast": 1}, "[demo] fast = 1 must be true or false."),
                         ({"limit": 99}, "[demo] limit 99 exceeds [demo] steps 30."),
                         ({"out": "x"}, "unknown key [demo] out; the keys of [demo] are steps, scale"),
                         ({"stpes": 3}, "unknown key [demo] stpes")]:
        with pytest.raises(MeddapError) as e:
            from_table(Demo, table, "demo", out="o")
        assert words in str(e.value), (words, str(e.value))


def test_a_changed_declaration_reaches_both_readers(monkeypatch):
    monkeypatch.setattr(Demo.__dataclass_fields__["steps"], "default", 7)
    assert "(default: 7)" in parser().format_help()
    assert from_args(Demo, parser().parse_args(["--out", "o"])).steps == 7
    assert from_table(Demo, {}, "demo", out="o").steps == 7
    assert from_table(Demo, {}, "demo", defaults={"steps": 9}, out="o").steps == 9


def test_as_dict_is_json_ready():
    assert as_dict(Demo(out="o")) == {"out": "o", "steps": 30, "scale": 7.5, "colour": "red",
                                      "ratios": [0.5, 1.0], "limit": None, "fast": False, "path": "weights"}
