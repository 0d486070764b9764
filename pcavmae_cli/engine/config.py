"""Recipe loading: YAML files, ``extends``, ``a.b.c=value`` overrides, strict validation.

A recipe is resolved in three steps: read the YAML (following ``extends`` to its parents and
merging child over parent), apply command-line overrides to that plain dict, then ``build``
the typed ``schema.Recipe`` tree. Every problem is a ``UserError`` that names the key, before
any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pcavmae_cli.engine import recipes as registry
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import Recipe

T = typing.TypeVar("T")


def read_text(path: Path) -> str:
    """A recipe file's text (UTF-8, as YAML says); an unreadable or non-UTF-8 file names itself."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        byte = exc.object[exc.start]
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {byte:#04x}); save the recipe as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """One YAML mapping from ``path``; a parse error names the file and line."""
    text = read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_raw(recipe: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged plain dict of a recipe name or path, ``extends`` resolved."""
    path = registry.resolve(recipe)
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise UserError(f"recipe 'extends' forms a cycle: {chain}")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"{path}: key 'extends' expects a recipe name or path, got {parent!r}")
    if not registry.is_name(parent):
        parent = str((path.parent / parent).resolve())
    return deep_merge(load_raw(parent, (*_seen, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b.c=value'`` -> ``(['a', 'b', 'c'], value)``, the value read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in a copy of ``data``; list items are addressed by index."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"override {text!r}: '{where}' is not an item of a {len(node)}-item list")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:  # node is a scalar
                raise UserError(f"override {text!r}: '{'.'.join(parts[:depth])}' is a value, not a section")
            if last:
                node[index] = value
            else:
                if isinstance(node, dict) and index not in node:
                    node[index] = {}  # a section the recipe left out; validation checks the key
                node = node[index]
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and, for numbers written as text, converted) against type ``tp``."""
    origin = typing.get_origin(tp)
    wrong = UserError(f"key '{key}' expects {_type_name(tp)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # "X | None": X's own error is the precise one
            return _convert(value, options[0], key)
        for arg in options:
            try:
                return _convert(value, arg, key)
            except UserError:
                continue
        raise wrong
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        return _finite(_float(value, wrong), value, key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise TypeError(f"schema type {tp!r} of '{key}' is not supported")  # a bug in schema.py


def _float(value: Any, wrong: UserError) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads '1e-4' as text
        try:
            return float(value)
        except ValueError:
            raise wrong from None
    raise wrong


def _finite(number: float, value: Any, key: str) -> float:
    """No setting of a recipe means anything as NaN or infinity (a bound that may be absent is
    ``null``): ``optim.lr=nan`` would train nothing and say nothing, so it is refused here."""
    if not math.isfinite(number):
        raise UserError(f"key '{key}' expects a finite number, got {value!r}")
    return number


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from plain ``data``, refusing unknown/missing/mistyped keys."""
    where = prefix or "the recipe"
    if not isinstance(data, dict):
        raise UserError(f"key '{where}' expects a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(fields)}"
            raise UserError(f"unknown key '{full}'{hint}")
    kwargs = {}
    for name, field in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], full)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise UserError(f"missing required key '{full}' ({_type_name(hints[name])})")
    return cls(**kwargs)


def load_recipe(recipe: str, overrides: list[str] | None = None) -> Recipe:
    """The validated recipe ``recipe`` (a shipped name or a YAML path) with ``overrides`` applied."""
    raw = apply_overrides(load_raw(recipe), list(overrides or []))
    return build(Recipe, raw)


def to_dict(config: Any) -> dict[str, Any]:
    """A resolved recipe as plain data, for ``config.yaml`` in a run folder."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False, width=100)
