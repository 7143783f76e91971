"""The one configuration system of dtop: YAML files that compose, ``key=value`` overrides, typed
dataclasses.

* A YAML file may name a base with ``_base_: other.yaml`` (or a list of them), resolved relative
  to the file; the file's own keys are merged over the base recursively (mappings merge, every
  other value replaces).
* Overrides on the command line are dotted ``key=value`` pairs (``model.dim=256``,
  ``model.layers=[-2,-1]``); values are parsed as YAML, so ``none``/``null``, numbers, lists work.
* :func:`from_dict` turns a mapping into a typed dataclass and rejects unknown keys and values
  of the wrong type with a message that names the key and suggests the closest valid one.
* The field types say what is valid: ``Literal[...]`` for a choice, :data:`PositiveInt` and the
  other :class:`AtLeast` / :class:`AtMost` bounds for numbers (floats are always finite);
  :func:`check_fields` applies them to a dataclass built directly (configs call it in
  ``__post_init__``).
* YAML is read with :data:`ConfigLoader`: duplicate keys are an error, ``1e-4`` is a float.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml

from dtop.errors import ConfigError

T = TypeVar("T")

BASE_KEY = "_base_"


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """A lower bound on a number, as ``Annotated[int, AtLeast(16)]`` in a config field's type."""

    minimum: float
    #: True: the value must be greater than ``minimum`` (``Positive``), not equal to it.
    exclusive: bool = False

    def describe(self) -> str:
        """The bound in words: ``positive``, ``non-negative`` or ``at least N``."""
        if self.minimum == 0:
            return "positive" if self.exclusive else "non-negative (0 or more)"
        return f"greater than {self.minimum:g}" if self.exclusive else f"at least {self.minimum:g}"

    def check(self, value: float, key: str) -> None:
        """Raise a ConfigError naming ``key`` unless ``value`` lies within the bound."""
        if value < self.minimum or (self.exclusive and value == self.minimum):
            raise ConfigError(f"config key {key!r} must be {self.describe()}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class AtMost:
    """An upper bound on a number, as ``Annotated[float, Positive, AtMost(1)]``; ``why`` ends the message."""

    maximum: float
    #: True: the value must be smaller than ``maximum``, not equal to it.
    exclusive: bool = False
    why: str = ""

    def describe(self) -> str:
        """The bound in words: ``at most N`` or ``less than N``."""
        return f"less than {self.maximum:g}" if self.exclusive else f"at most {self.maximum:g}"

    def check(self, value: float, key: str) -> None:
        """Raise a ConfigError naming ``key`` unless ``value`` lies within the bound."""
        if value > self.maximum or (self.exclusive and value == self.maximum):
            why = f" ({self.why})" if self.why else ""
            raise ConfigError(f"config key {key!r} must be {self.describe()}{why}, got {value!r}")


Positive = AtLeast(0, exclusive=True)
NonNegative = AtLeast(0)
PositiveInt = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
PositiveFloat = Annotated[float, Positive]
NonNegativeFloat = Annotated[float, NonNegative]


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e-4`` as a float.

    YAML 1.1 (PyYAML) wants a dot in a float (``1.0e-4``) and reads ``1e-4`` as a string, which then
    failed as "not a float"; YAML 1.2 and every user read it as a number.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping; a key given twice is an error naming the key and both lines."""
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base class report it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats: a mantissa without a dot (``1e-4``, ``5E3``) is a float too.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text with :class:`ConfigLoader` (``source`` names it in error marks)."""
    loader = ConfigLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML file (without resolving ``_base_``) as a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[err.start]:#04x} on line {line}); "
                          "save it as UTF-8") from err
    try:
        data = parse_yaml(text, str(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error as one line (PyYAML's message spans several, with a code excerpt)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{err.problem or err.context}{where}"
    return " ".join(str(err).split())


def load_config(path: str | Path, overrides: Sequence[str] = (), _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config with its ``_base_`` chain resolved and ``key=value`` overrides applied."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config files include each other in a cycle: {chain}")
    data = load_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name or a list of file names "
                          f"(e.g. {BASE_KEY}: ../models/dtop_tiny.yaml), got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, load_config(path.parent / base, (), (*_seen, path)))
    merged = merge(merged, data)
    return apply_overrides(merged, overrides)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` over ``base`` (mappings merge, other values replace)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. model.dim=256)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {_one_line(err)}") from err
    return key.split("."), value


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a (copy of a) config mapping."""
    out = copy.deepcopy(dict(config))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """Turn a config dataclass into plain data (JSON/YAML serialisable)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build the config dataclass ``cls`` from ``data``, checking keys and values.

    ``where`` names the section in error messages (e.g. ``"model"``).
    """
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        section = f"section {where!r}" if where else f"the {cls.__name__} config"
        raise ConfigError(f"config {section} must be a mapping of keys to values, got {type(data).__name__} "
                          f"{_short(data)}")
    data = dict(data)
    hints = _field_hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(hints), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else "."
        raise ConfigError(
            f"unknown config key '{prefix}{key}'{hint} Valid keys: {', '.join(sorted(hints))}"
        )
    kwargs = {key: _check_type(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"invalid {where or cls.__name__} config: {err}") from err


def check_fields(obj: Any, where: str = "") -> None:
    """Check every field of the dataclass instance ``obj`` against its type (in place).

    Values are converted as :func:`from_dict` converts them (ints to floats, tuples to lists), so a
    config built directly is as valid as one read from a file. ``where`` prefixes the key names.
    """
    prefix = f"{where}." if where else ""
    for name, hint in _field_hints(type(obj)).items():
        object.__setattr__(obj, name, _check_type(getattr(obj, name), hint, f"{prefix}{name}"))


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """Field name → resolved type hint (``Annotated`` kept) of a dataclass (cached per class)."""
    if cls not in _HINTS:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        hints = typing.get_type_hints(cls, include_extras=True)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint, converting ints to floats and tuples to lists."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is Annotated:
        value = _check_type(value, args[0], key)
        for marker in args[1:]:
            if isinstance(marker, AtLeast | AtMost):
                marker.check(value, key)
        return value
    if origin is Literal:
        return _check_choice(value, args, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf/.nan: no setting of dtop means "infinite"
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key {key!r} must be of type {name}, got {_short(value)}")


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a whole section pasted as a value stays one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_choice(value: Any, choices: tuple[Any, ...], key: str) -> Any:
    """``value`` if it is one of the ``Literal`` choices, else a ConfigError suggesting the closest."""
    # type() too: True == 1, but a YAML ``true`` is not the choice ``1``
    if any(value == c and type(value) is type(c) for c in choices):
        return value
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"config key {key!r} must be one of {', '.join(names)}, got {value!r}{hint}")
