"""rankdown.schema: the one parser for enums, typed JSON and CLI defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pytest

from rankdown.errors import RankdownError
from rankdown.schema import build, coerce_enums, default_of, dump_json, name_enum, parse_enum, parse_enums, read_dataclass


class Colour(str, Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    size: int
    scale: float = 1.0


@dataclass(frozen=True)
class Outer:
    colour: Colour
    inners: dict[str, Inner]
    sizes: tuple[int, ...] = ()
    where: Path | None = None
    note: str = ""
    extras: list[str] = field(default_factory=list)

    def __post_init__(self):
        coerce_enums(self)


def test_parse_enum_names_the_option_and_every_choice():
    assert parse_enum(Colour, "blue", "--colour") is Colour.BLUE
    with pytest.raises(RankdownError, match=r"unknown --colour 'green': choose one of red, blue$"):
        parse_enum(Colour, "green", "--colour")


def test_coerce_enums_turns_text_into_members_in_post_init():
    assert Outer(colour="red", inners={}).colour is Colour.RED  # type: ignore[arg-type]
    with pytest.raises(RankdownError, match="unknown --colour 'pink'"):
        Outer(colour="pink", inners={})  # type: ignore[arg-type]


def test_round_trip_through_json_gives_an_equal_tree():
    value = Outer(Colour.BLUE, {"a": Inner(3, 0.5)}, (1, 2), Path("/x/y"), "n", ["e"])
    assert build(Outer, json.loads(dump_json(value)), "outer") == value


@pytest.mark.parametrize("raw, message", [
    ({"colour": "red", "inners": {}, "bogus": 1}, r"outer: unknown keys \['bogus'\]"),
    ({"inners": {}}, r"outer: missing keys \['colour'\]"),
    ({"colour": "red", "inners": {"a": {"size": "3"}}}, r"outer\.inners\.a\.size: expected int, got str"),
    ({"colour": "red", "inners": {"a": {"size": True}}}, r"expected int, got bool"),
    ({"colour": "green", "inners": {}}, r"outer\.colour: 'green' is not one of \['red', 'blue'\]"),
    ({"colour": "red", "inners": [], }, r"outer\.inners: expected an object"),
    ({"colour": "red", "inners": {}, "sizes": 3}, r"outer\.sizes: expected a list"),
])
def test_build_refuses_unknown_missing_and_mistyped_keys(raw, message):
    with pytest.raises(ValueError, match=message):
        build(Outer, raw, "outer")


def test_read_dataclass_errors_name_the_file(tmp_path):
    path = tmp_path / "thing.json"
    path.write_text('{"colour": "red", "inners": {}, "x": 1}')
    with pytest.raises(RankdownError, match=rf"^{path}: invalid thing report: .*unknown keys \['x'\]"):
        read_dataclass(Outer, path, "thing report")
    path.write_text("{not json")
    with pytest.raises(RankdownError, match=rf"^{path}: invalid thing report: "):
        read_dataclass(Outer, path, "thing report")


def test_default_of_reads_the_dataclass_default_once():
    assert default_of(Inner, "scale") == 1.0
    assert default_of(Outer, "extras") == []
    with pytest.raises(KeyError, match="Inner.size has no default"):
        default_of(Inner, "size")


@dataclass(frozen=True)
class Palette:
    colours: tuple[Colour, ...] = field(default=(Colour.RED,), metadata={"option": "--colour"})
    accent: Colour | None = None

    def __post_init__(self):
        coerce_enums(self)


def test_coerce_enums_parses_a_comma_list_once_each_under_the_option_given():
    assert Palette(colours="blue,red,blue").colours == (Colour.BLUE, Colour.RED)  # type: ignore[arg-type]
    assert Palette(colours=["red"], accent="blue").accent is Colour.BLUE  # type: ignore[arg-type]
    with pytest.raises(RankdownError, match=r"unknown --colour 'pink': choose one of red, blue$"):
        Palette(colours="red,pink")  # type: ignore[arg-type]


def test_name_enum_makes_members_from_registered_names():
    Kind = name_enum("Kind", ["arm64-emu", "onnx"], __name__)
    assert Kind.ARM64_EMU.value == "arm64-emu" and Kind("onnx") is Kind.ONNX and Kind.ONNX == "onnx"
    assert parse_enums(Kind, "onnx,arm64-emu", "--kind") == (Kind.ONNX, Kind.ARM64_EMU)
