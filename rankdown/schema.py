"""One way to parse what users and files give us: enums, typed JSON, CLI choices and defaults.

Every config dataclass and every JSON file the project reads (``compression.json``,
``manifest.json``, ``report.json``, ``factors.json``, device profiles) goes through these
helpers, so an unknown mode, an unknown key or a wrong type fails the same way everywhere:
one ``RankdownError`` line naming the option or file and the choices.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from rankdown.errors import RankdownError

E = TypeVar("E", bound=Enum)
T = TypeVar("T")


def choices(enum: type[Enum]) -> list[str]:
    """The values a user may type for an enum option, in declaration order."""
    return [str(m.value) for m in enum]


def name_enum(name: str, values: list[str], module: str) -> Any:
    """A text enum whose members are a registry's names (``"arm64-emu"`` -> ``ARM64_EMU``), so that
    a registration is the only place a new name is written and parsing stays ``parse_enum``'s."""
    members = [(v.upper().replace("-", "_").replace(".", "_"), v) for v in values]
    return Enum(name, members, module=module, type=str)


def parse_enum(enum: type[E], value: Any, option: str) -> E:
    """``value`` as a member of ``enum``; an unknown value names the option and the choices."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise RankdownError(f"unknown {option} {value!r}: choose one of {', '.join(choices(enum))}") from None


def parse_enums(enum: type[E], value: Any, option: str) -> tuple[E, ...]:
    """A comma-separated text or a sequence as members of ``enum``, in order, each once."""
    items = [v for v in value.split(",") if v] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(parse_enum(enum, v, option) for v in items))


def coerce_enums(instance: Any) -> None:
    """In a (frozen) dataclass's ``__post_init__``: turn every enum-typed field given as text
    into its member, and every ``tuple[Enum, ...]`` field given as a comma-separated text or a
    sequence into members (each once), with ``parse_enum``'s error. The option is named as on
    the command line: ``option_name`` of the field, or the field's ``metadata["option"]``."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if value is None:
            continue
        option = f.metadata.get("option", option_name(f.name))
        enum = _enum_of(hints[f.name])
        if enum is not None:
            object.__setattr__(instance, f.name, parse_enum(enum, value, option))
        elif (items := _enum_items_of(hints[f.name])) is not None:
            object.__setattr__(instance, f.name, parse_enums(items, value, option))


def option_name(field_name: str) -> str:
    """A config field's command-line spelling: ``basis_mode`` -> ``--basis-mode``."""
    return "--" + field_name.replace("_", "-")


def default_of(cls: type, field_name: str) -> Any:
    """A config field's one default, so the CLI repeats no default by hand."""
    for f in dataclasses.fields(cls):
        if f.name == field_name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{field_name} has no default")
    raise KeyError(f"{cls.__name__} has no field {field_name}")


def help_with_default(text: str, cls: type, field_name: str) -> str:
    default = default_of(cls, field_name)
    if isinstance(default, Enum):
        default = default.value
    return f"{text} (default: {default})"


def to_jsonable(value: Any) -> Any:
    """A dataclass tree as plain JSON values: enums by value, paths as text, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def dump_json(value: Any, sort_keys: bool = False) -> str:
    return json.dumps(to_jsonable(value), indent=2, sort_keys=sort_keys) + "\n"


def read_json_file(path: Path, what: str) -> Any:
    """Parsed JSON, or one line naming the file when it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RankdownError(f"{path}: invalid {what}: {e}") from None


def build(cls: type[T], raw: Any, where: str) -> T:
    """A dataclass tree from JSON values, refusing unknown or missing keys and wrong types.

    Raises ``ValueError`` naming the dotted key that is wrong; callers add the file's name.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    names = {f.name for f in fields}
    if set(raw) - names:
        raise ValueError(f"{where}: unknown keys {sorted(set(raw) - names)}")
    required = {f.name for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if required - set(raw):
        raise ValueError(f"{where}: missing keys {sorted(required - set(raw))}")
    return cls(**{k: _value(hints[k], v, f"{where}.{k}") for k, v in raw.items()})


def read_dataclass(cls: type[T], path: Path, what: str, raw: Any = None) -> T:
    """``cls`` read from the JSON file ``path`` (or from ``raw`` already parsed from it)."""
    if raw is None:
        raw = read_json_file(path, what)
    try:
        return build(cls, raw, what.replace(" ", "_"))
    except (ValueError, TypeError) as e:
        raise RankdownError(f"{path}: invalid {what}: {e}") from None


def _enum_items_of(hint: Any) -> type[Enum] | None:
    """``E`` for a ``tuple[E, ...]`` hint (or an optional one)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), None)
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return _enum_of(args[0])
    return None


def _enum_of(hint: Any) -> type[Enum] | None:
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, Enum):
                return arg
    return None


def _value(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        rest = [a for a in options if a is not type(None)]
        if len(rest) > 1:  # e.g. float | str: the first that accepts the value
            for option in rest:
                try:
                    return _value(option, value, where)
                except ValueError:
                    continue
            raise ValueError(f"{where}: expected one of {[getattr(a, '__name__', str(a)) for a in rest]}")
        hint = rest[0]
        origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)  # type: ignore[arg-type]
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not one of {choices(hint)}") from None
    if hint is Path:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a path")
        return Path(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object")
        if hint is dict:
            return value
        _key_type, value_type = typing.get_args(hint)
        return {k: _value(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list")
        args = typing.get_args(hint)
        item_type = args[0] if args else Any
        items = [_value(item_type, v, where) for v in value]
        return tuple(items) if origin is tuple or hint is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float) and type(value) is not hint:
        raise ValueError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value
