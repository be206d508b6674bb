"""Declarative checks of request fields: a table of name -> Field, one function that converts and checks.

JSON bodies give typed values; multipart forms give strings, converted by the same table. Every failure is
an ApiError naming the field; NaN and infinities are refused wherever a number is expected.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .errors import ApiError


@dataclass(frozen=True)
class Field:
    kind: str  # int, float, str, bool, layers (block indices), loras (name -> scale), objects (a list of JSON
    # objects; in a form, JSON text), any (not checked)
    low: float | None = None  # inclusive bounds of numbers
    high: float | None = None


def parse_fields(values: dict, table: dict[str, Field], *, form: bool = False, status: int = 400,
                 prefix: str = "") -> dict:
    """The fields of `values` that are in `table`, converted and checked; None values are left out. prefix: where
    `values` sits in the request (e.g. "controlnets[0]."), for messages."""
    out = {}
    for name, value in values.items():
        field = table.get(name)
        if field is None or value is None:
            continue
        try:
            out[name] = _convert(value, field, form)
        except (TypeError, ValueError) as e:
            raise ApiError(status, f"{prefix}{name}: {e}", param=prefix + name, code="invalid_value") from None
    return out


def _convert(value, field: Field, form: bool):
    if form and field.kind not in ("str", "any") and isinstance(value, str):
        value = _from_text(value, field.kind)
    kind = field.kind
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_show(value)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {_show(value)}")
        return value
    if kind in ("int", "float"):
        return _number(value, field)
    if kind == "layers":
        return _layers(value)
    if kind == "loras":
        return _loras(value)
    if kind == "objects":
        if not isinstance(value, list):
            raise TypeError(f"expected a list of objects, got {_show(value)}")
        other = next((v for v in value if not isinstance(v, dict)), None)
        if other is not None:
            raise TypeError(f"expected a list of objects, got a list holding {_show(other)}")
        return value
    raise AssertionError(kind)


def _from_text(text: str, kind: str):
    """A form field's text as the JSON value it stands for."""
    text = text.strip()
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text[:40]!r}")
    if kind in ("int", "float"):
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind == 'int' else 'a number'}, got {text[:40]!r}") from None
    if kind == "objects":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("expected JSON text: a list of objects") from None
    if kind == "loras" and text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("expected a JSON object of name: scale, or names separated by commas") from None
    return text  # layers: "7,8,9"; loras: "a,b"


def _number(value, field: Field):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected {'an integer' if field.kind == 'int' else 'a number'}, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if field.kind == "int":
        if value != int(value):
            raise ValueError(f"expected an integer, got {value}")
        value = int(value)
    else:
        value = float(value)
    if (field.low is not None and value < field.low) or (field.high is not None and value > field.high):
        low = "-inf" if field.low is None else f"{field.low:g}"
        high = "inf" if field.high is None else f"{field.high:g}"
        raise ValueError(f"must be in [{low}, {high}], got {value}")
    return value


def _layers(value) -> tuple[int, ...]:
    """[7, 8, 9], "7,8,9"; [] or "none" turns skip-layer guidance off."""
    if isinstance(value, str):
        if value.strip().lower() in ("", "none"):
            return ()
        try:
            value = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(f"expected block indices like 7,8,9 or 'none', got {value[:40]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"expected a list of block indices, got {_show(value)}")
    if any(v < 0 or v > 1000 for v in value):
        raise ValueError("block indices must be in [0, 1000]")
    return tuple(value)


def _loras(value) -> dict[str, float | None]:
    """{"name": scale, ...} or ["name", ...] (scale as loaded) or "a,b"; {} or [] or "none": no adapter."""
    if isinstance(value, str):
        value = [] if value.strip().lower() in ("", "none") else [part.strip() for part in value.split(",")]
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise TypeError(f"expected names of loaded LoRAs, got {_show(value)}")
        value = dict.fromkeys(value)
    if not isinstance(value, dict):
        raise TypeError(f"expected an object of LoRA name: scale, or a list of names, got {_show(value)}")
    for name, scale in value.items():
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or abs(scale) > 100):
            raise ValueError(f"the scale of {name!r} must be a finite number in [-100, 100], got {_show(scale)}")
    return {name: None if scale is None else float(scale) for name, scale in value.items()}


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
