"""Typed configs from the command line: ``field=value`` overrides of (nested) dataclasses.

Every field of every config can be overridden, e.g. ``mcu.epochs=5 mask.k=0.1
selection.include_test=false``; values are parsed by the field's declared type, and an
unknown field is an error that lists the known ones; a value the config refuses is an error
that names the override (``mask.k=1.5: k must be a fraction in [0, 1], got 1.5``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(text: str, annotation: Any, field: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg, field)
            except ValueError:
                continue
        raise ValueError(f"{field}: cannot parse {text!r} as {annotation}")
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{field}: expected true/false, got {text!r}")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"{field}: expected {annotation.__name__}, got {text!r}") from None
    if origin is tuple:
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        elem = args[0] if args else str
        return tuple(_parse(s.strip(), elem, field) for s in items)
    return text


def field_names(config: Any, prefix: str = "") -> list[str]:
    """Every overridable field of ``config`` as a dotted name."""
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            names += field_names(value, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


class UnsetGroup(ValueError):
    """An override reaches into a group of fields that is None (unset)."""


def override(config: Any, assignments: Iterable[str],
             fill: Callable[[Any], Any] | None = None) -> Any:
    """A copy of the dataclass ``config`` with ``name=value`` assignments applied.

    The assignments to one group's fields are applied together (one ``dataclasses.replace``,
    so one run of its checks), so fields that are checked against each other can be given
    in any order (``problem.forget_class=3 problem.scenario=class``); a later assignment of
    the same field wins. A group that is None (e.g. "the paper's values for the problem")
    has no fields to set: ``fill(config)``, when given, returns the config with such groups
    written out and is applied first (so an unknown field's error lists their fields too);
    without it an assignment into one is refused."""
    given = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value")
        name, text = (part.strip() for part in item.split("=", 1))
        given.pop(name, None)  # keeps the order of the last assignment
        given[name] = text
    return _apply(config if fill is None else fill(config), given, "")


def _apply(config: Any, given: dict[str, str], prefix: str) -> Any:
    """``config`` with ``given`` (full dotted names, all below ``prefix``, -> text)."""
    hints = typing.get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}
    groups: dict[str, dict[str, str]] = {}
    values = {}
    for full, text in given.items():
        head, _, rest = full[len(prefix):].partition(".")
        if head not in known:
            raise ValueError(
                f"unknown config field {full!r}; known fields: "
                f"{', '.join(field_names(config, prefix))}"
            )
        current = getattr(config, head)
        if rest and current is None:
            raise UnsetGroup(f"{full!r}: {prefix}{head} is None (unset), so it has no field "
                             f"{rest!r}; set {prefix}{head} in the config first")
        if rest:
            if not dataclasses.is_dataclass(current):
                raise ValueError(f"config field {head!r} has no sub-field {rest!r}")
            groups.setdefault(head, {})[full] = text
        elif dataclasses.is_dataclass(current) or _is_group(hints[head]):
            raise ValueError(f"{full!r} is a group of fields; set one of its fields instead")
        else:
            values[head] = _parse(text, hints[head], full)
    changes = {head: _apply(getattr(config, head), sub, f"{prefix}{head}.")
               for head, sub in groups.items()}
    if not changes and not values:
        return config
    try:  # the config's own checks (its __post_init__), named by the overrides
        return dataclasses.replace(config, **changes, **values)
    except (ValueError, TypeError) as err:
        named = [f"{prefix}{head}" for head in values] or list(given)
        raise ValueError(f"{', '.join(f'{n}={given[n]}' for n in named)}: {err}") from None


def _is_group(annotation: Any) -> bool:
    """Whether a field's type is a config dataclass (or one or None)."""
    args = typing.get_args(annotation) or (annotation,)
    return any(isinstance(a, type) and dataclasses.is_dataclass(a) for a in args)


def to_dict(config: Any) -> dict:
    """The config as plain JSON-friendly data."""
    return dataclasses.asdict(config)
