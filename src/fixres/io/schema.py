"""Reading a JSON document into a typed result: every field checked against its annotation once, at the boundary.

A result type is a dataclass; ``parse(Type, document)`` builds it from the JSON object a file held. Each field is
looked up by its name and kept only when it is what the annotation says (``int``, ``float``, ``str``, ``bool``,
``X | None``, ``tuple[X, ...]``, ``list[X]``, ``dict[str, X]``, a nested result type, or ``object`` for anything).
A field that is missing or of the wrong type (text where a number belongs, NaN, a list where an object belongs)
takes its default, so a hand-edited or damaged number reads as missing rather than as a wrong number; a field
without a default makes the whole document unreadable (``SchemaError``). Elements of a sequence or mapping that
do not read are left out. ``dump`` is the inverse: the JSON object a result type is written as.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache

#: A parsed value that is not there or not of its type (distinct from a JSON null, which is ``None``).
_MISSING = object()


class SchemaError(ValueError):
    """A document lacks a field its type requires, or holds it with the wrong type."""


@cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _key(f: dataclasses.Field) -> str:
    """The JSON name of a field: its own, or the one ``metadata={"json": ...}`` gives."""
    return f.metadata["json"] if "json" in f.metadata else f.name


def _transient(f: dataclasses.Field) -> bool:
    """A field held in memory only (``metadata={"transient": True}``): never read from or written to JSON."""
    return bool(f.metadata["transient"]) if "transient" in f.metadata else False


def _scalar(tp, value):
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if isinstance(value, bool):  # JSON true/false is not a number
        return _MISSING
    if tp is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else _MISSING
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else _MISSING
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    return _MISSING


def _items(tp_args, value, container):
    if not isinstance(value, list):
        return _MISSING
    element = tp_args[0] if tp_args else object
    read = (read_value(element, v) for v in value)
    return container(v for v in read if v is not _MISSING)


def _mapping(tp_args, value):
    if not isinstance(value, dict):
        return _MISSING
    element = tp_args[1] if len(tp_args) == 2 else object
    read = {str(k): read_value(element, v) for k, v in value.items()}
    return {k: v for k, v in read.items() if v is not _MISSING}


def read_value(tp, value):
    """``value`` read as type ``tp``, or ``_MISSING`` when it is not one."""
    if tp is object or tp is typing.Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _MISSING
        for option in (a for a in args if a is not type(None)):
            got = read_value(option, value)
            if got is not _MISSING:
                return got
        return _MISSING
    if value is None:
        return _MISSING
    if origin is tuple or tp is tuple:
        return _items(args, value, tuple)
    if origin is list or tp is list:
        return _items(args, value, list)
    if origin is dict or tp is dict:
        return _mapping(args, value)
    if dataclasses.is_dataclass(tp):
        try:
            return parse(tp, value)
        except SchemaError:
            return _MISSING
    return _scalar(tp, value)


def parse(cls, doc, **given):
    """The result type ``cls`` read from the JSON object ``doc`` (see the module's rules); ``given`` fields are
    set as they are (a field marked ``transient``, such as the document itself, is never read from it)."""
    if not isinstance(doc, dict):
        raise SchemaError(f"{cls.__name__}: expected a JSON object, got {type(doc).__name__}")
    hints = _hints(cls)
    values = dict(given)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in given or _transient(f):
            continue
        key = _key(f)
        got = read_value(hints[f.name], doc[key]) if key in doc else _MISSING
        if got is not _MISSING:
            values[f.name] = got
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{cls.__name__}: field {key!r} is missing or not a {hints[f.name]}")
    return cls(**values)


def parse_or_none(cls, doc):
    """``parse(cls, doc)``, or None when the document does not read as ``cls``."""
    try:
        return parse(cls, doc)
    except SchemaError:
        return None


def dump(value, *, omit_none: bool = False):
    """A result type (or any value holding them) as JSON-ready data: tuples as lists, result types as objects
    keyed by their fields' JSON names; with ``omit_none``, a result type's fields that are None are left out
    (a document that holds only what was measured)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        pairs = ((_key(f), getattr(value, f.name)) for f in dataclasses.fields(value) if not _transient(f))
        return {k: dump(v, omit_none=omit_none) for k, v in pairs if not (omit_none and v is None)}
    if isinstance(value, (list, tuple)):
        return [dump(v, omit_none=omit_none) for v in value]
    if isinstance(value, dict):
        return {k: dump(v, omit_none=omit_none) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class KeptDocument:
    """A result type that keeps the JSON document it was read from and writes that document back whole
    (``to_json``): what a resumed run hands on is exactly what a fresh one did, fields the type leaves out
    included."""

    document: dict | None = dataclasses.field(default=None, repr=False, compare=False,
                                              metadata={"transient": True})

    @classmethod
    def from_json(cls, doc: dict):
        return parse(cls, doc, document=doc)

    def to_json(self) -> dict | None:
        return self.document
