"""Pydantic validation errors as an error answer lists them (``details.fields``): one
``{"field", "problem"}`` per error, without a byte of the request in it.

Pydantic's own message is kept only for the error types whose message is made of the model's
words alone (limits, allowed values, the expected type). Others fill in text taken from the
input (a UUID's bad character, a JSON decoder's or an e-mail checker's reason, a union tag):
they get a fixed message naming the error type instead. ``value_error`` messages are kept only
when the caller wrote every validator of the model (``own_messages``). The field is the
error's location, minus the name of an undeclared field (``extra_forbidden``: the client's).
Used by the upload form (:func:`.intake.parse_form`) and by the web layer's handler of
invalid path and query parameters.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: pydantic error types whose message holds no input, only the model's own words
SAFE_TYPES = frozenset({
    "missing", "extra_forbidden", "none_required", "string_type", "string_unicode",
    "string_too_short", "string_too_long", "string_pattern_mismatch", "string_not_ascii",
    "enum", "literal_error", "int_type", "int_parsing", "int_parsing_size", "int_from_float",
    "float_type", "float_parsing", "bool_type", "bool_parsing", "greater_than",
    "greater_than_equal", "less_than", "less_than_equal", "multiple_of", "finite_number",
    "too_short", "too_long", "list_type", "dict_type", "model_type", "model_attributes_type",
    "json_type", "uuid_type", "decimal_parsing", "bytes_too_short", "bytes_too_long"})
#: the types whose message is a validator's own text (``Value error, …``)
OWN_MESSAGE_TYPES = frozenset({"value_error", "assertion_error"})


def validation_problems(errors: Iterable[Mapping[str, Any]], *,
                        own_messages: bool = False) -> list[dict[str, str]]:
    """``[{"field": "query.limit", "problem": "Input should be …"}]`` for pydantic's
    ``errors()`` (``ValidationError`` or FastAPI's ``RequestValidationError``).

    Args:
        errors: the error dicts (``type``, ``loc``, ``msg``; ``input`` and ``ctx`` are never
            read).
        own_messages: every ``value_error``/``assertion_error`` comes from a validator whose
            message quotes no input (the caller wrote them all), so it may be shown.

    Returns: one problem per error, in order; ``field`` is the location joined with ``.``.
    """
    out = []
    for e in errors:
        kind = str(e.get("type", ""))
        loc = [str(p) for p in e.get("loc", ())]
        if kind == "extra_forbidden" and loc:
            loc = loc[:-1] + ["(a field not defined here)"]
        safe = kind in SAFE_TYPES or (own_messages and kind in OWN_MESSAGE_TYPES)
        problem = str(e.get("msg", "")) if safe else f"Invalid value ({kind})."
        out.append({"field": ".".join(loc), "problem": problem})
    return out
