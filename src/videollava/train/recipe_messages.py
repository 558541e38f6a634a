"""Recipe errors in the recipe's own words: a pydantic error becomes one line naming the key's full
path, what is wrong and the value found, with the nearest valid key for a misspelt one."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel

# Problems with a value's type or a key (message "<path>: <problem> [stage '<label>']"), as opposed
# to a value out of its bounds ("stages[<i>] (<label>).<key>: <problem>").
_TYPE_ERRORS = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a number",
    "bool_type": "expected true/false",
    "bool_parsing": "expected true/false",
    "string_type": "expected a string",
}


def describe(
    error: Any, raw: dict[str, Any], root: type[BaseModel], kinds: dict[str, type[BaseModel]]
) -> str:
    """One pydantic error as the recipe's message: the key's path, what is wrong, the value found.

    `root` is the recipe's section class, `kinds` each stage kind's section class.
    """
    loc = list(error["loc"])
    kind, value, context = error["type"], error.get("input"), error.get("ctx") or {}
    stage = None  # (index, label, kind) when the error lies in a stage
    if (
        loc[:1] == ["stages"]
        and len(loc) > 1
        and isinstance(loc[1], int)
        and isinstance(raw.get("stages"), list)
    ):
        entry = raw["stages"][loc[1]]
        if len(loc) > 2 and loc[2] in kinds:
            del loc[2]  # the discriminator's tag
        if isinstance(entry, dict):
            stage = (loc[1], entry.get("name") or entry.get("kind"), entry.get("kind"))
        if len(loc) == 2:
            if not isinstance(entry, dict):
                return f"{_path(loc)}: a stage is a mapping with a 'kind'"
            if kind.startswith("union_tag"):
                return f"{_path(loc)}.kind: expected one of {', '.join(kinds)}, got {entry.get('kind')!r}"
    where = _path(loc)
    tail = f" [stage {stage[1]!r}]" if stage is not None else ""
    if kind == "extra_forbidden":
        parent = _path(loc[:-1])
        keys = _keys(_section_at(loc[:-1], stage, root, kinds))
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: unknown key {loc[-1]!r} in {parent or 'recipe'}{hint}; valid keys: {', '.join(keys)}{tail}"
    if kind == "missing":
        return f"{where}: required key is missing{tail}"
    if kind in _TYPE_ERRORS:
        return f"{where}: {_TYPE_ERRORS[kind]}, got {value!r}{tail}"
    if kind == "literal_error":
        return f"{where}: expected {context['expected'].replace(', ', ' or ')}, got {value!r}{tail}"
    if kind == "list_type":
        return f"{where}: expected {_type_name(_annotation_at(loc, stage, root, kinds))}, got {value!r}{tail}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: expected a mapping, got {type(value).__name__}{tail}"
    # A value out of bounds, or refused by a check of its own.
    if stage is not None:
        where = _path([f"stages[{stage[0]}] ({stage[1]})", *loc[2:]])
    if kind == "greater_than":
        bound = "must be positive" if context["gt"] == 0 else f"must be greater than {context['gt']}"
        return f"{where}: {bound}, got {value}"
    if kind == "greater_than_equal":
        bound = "must not be negative" if context["ge"] == 0 else f"must be at least {context['ge']}"
        return f"{where}: {bound}, got {value}"
    message = str(context.get("error", error["msg"]))
    key, sep, rest = message.partition(": ")
    # "<field>: <problem>" from a config's own check
    if sep and key in _keys(_section_at(loc, stage, root, kinds)):
        return f"{where}.{key}: {rest}"
    return f"{where}: {message}"


def _path(loc: list[Any]) -> str:
    out = ""
    for key in loc:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
    return out


def _model_in(annotation: Any) -> Any:
    """The section class an annotation holds (through Optional, Annotated, list), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields(section: Any) -> dict[str, Any]:
    """A section's fields by the key a recipe writes."""
    if section is None:
        return {}
    return {f.alias or name: f for name, f in section.model_fields.items()}


def _keys(section: Any) -> list[str]:
    return list(_fields(section))


def _section_at(
    loc: list[Any], stage: tuple[int, Any, Any] | None, root: type[BaseModel], kinds: dict[str, Any]
) -> Any:
    """The section class found at a path of the recipe (a stage's by its kind), or None."""
    section: Any = root
    for depth, key in enumerate(loc):
        if isinstance(key, int):
            if depth == 1 and stage is not None:
                section = kinds.get(stage[2], section)
            continue
        field = _fields(section).get(key)
        if field is None:
            return None
        section = _model_in(field.annotation)
    return section


def _annotation_at(
    loc: list[Any], stage: tuple[int, Any, Any] | None, root: type[BaseModel], kinds: dict[str, Any]
) -> Any:
    field = _fields(_section_at(loc[:-1], stage, root, kinds)).get(loc[-1])
    return field.annotation if field is not None else Any


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in typing.get_args(tp)))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))
