"""JSON Schema → GBNF grammar for constrained answers, failing closed.

The converter is llama-cpp-python's own `json_schema_to_gbnf` (a port of llama.cpp's). It
enforces some keywords and silently ignores others (`minimum`, `format: email`, ...), so a
schema is first checked against the subset it enforces *exactly*, mirroring the order in
which the converter picks a branch: anything else is a `ConstraintError` naming the keyword
and where it stands (the API answers 400). Never an unconstrained answer to a schema.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

# Keywords that only describe; the converter may ignore them without loosening anything.
ANNOTATIONS = frozenset({
    "title", "description", "$comment", "examples", "default", "$schema", "$id",
    "deprecated", "readOnly", "writeOnly", "$defs", "definitions",
})
PRIMITIVES = frozenset({"string", "number", "integer", "boolean", "null"})
STRING_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
# Counted repetitions unroll into nested grammar rules: bound them (and the whole grammar).
MAX_REPEAT = 256
MAX_GRAMMAR_BYTES = 256 * 1024

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "null": (type(None),), "object": (dict,), "array": (list,),
}

# The converter's string character rule lets raw control characters through, which no JSON
# parser accepts inside a string: exclude them (escaped forms like \n stay allowed).
_CHAR_RULE = re.compile(r'^char ::= \[\^"\\\\\]', re.MULTILINE)
_STRICT_CHAR_RULE = r'char ::= [^"\\\x00-\x1F]'


class ConstraintError(ValueError):
    """A schema the grammar could not enforce exactly; the message names keyword and path."""


def check_schema(schema: object) -> None:
    """What schema_grammar refuses before it converts: a keyword it cannot enforce exactly
    (cheap; the conversion is what costs)."""
    if not isinstance(schema, Mapping):
        raise ConstraintError("the schema must be a JSON object")
    _Checker(schema).check(schema, "#")


def schema_grammar(schema: object) -> str:
    """The GBNF grammar whose every sentence is a JSON document valid against `schema`."""
    check_schema(schema)
    try:
        grammar = json_schema_to_gbnf(json.dumps(copy.deepcopy(schema)))
    except (AssertionError, KeyError, ValueError, RecursionError, TypeError) as exc:
        raise ConstraintError(f"the schema could not be turned into a grammar: {exc}") from None
    return _strict_strings(grammar)


def json_object_grammar() -> str:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    return _strict_strings(json_schema_to_gbnf(json.dumps({"type": "object"})))


def _strict_strings(grammar: str) -> str:
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise ConstraintError(f"the schema makes a grammar of {len(grammar)} bytes; the limit is "
                              f"{MAX_GRAMMAR_BYTES} (fewer or smaller repetition bounds, enums)")
    return _CHAR_RULE.sub(lambda _: _STRICT_CHAR_RULE, grammar)


class _Checker:
    """Walks a schema the way the converter does and refuses what it would not enforce."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    def check(self, schema: object, path: str) -> None:
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"{path}: a schema must be a JSON object here")
        keys = set(schema) - ANNOTATIONS
        for defs in ("$defs", "definitions"):
            if isinstance(schema.get(defs), Mapping):
                for name, sub in schema[defs].items():
                    self.check(sub, f"{path}/{defs}/{name}")
        if "$ref" in schema:
            self._only(schema, keys, {"$ref"}, path)
            self._resolve(schema["$ref"], path)
        elif "anyOf" in schema:
            self._only(schema, keys, {"anyOf"}, path)
            self._each(schema["anyOf"], f"{path}/anyOf", "anyOf")
        elif "oneOf" in schema:
            raise ConstraintError(f"{path}/oneOf: not supported (the grammar cannot enforce "
                                  "'exactly one'); use anyOf")
        elif isinstance(schema.get("type"), list):
            self._only(schema, keys, {"type"}, path)
            for i, name in enumerate(schema["type"]):
                if name not in PRIMITIVES:
                    raise ConstraintError(f"{path}/type/{i}: a list of types may hold only "
                                          f"{sorted(PRIMITIVES)}, not {name!r}")
        elif "const" in schema:
            self._only(schema, keys, {"const", "type"}, path)
            self._typed_values([schema["const"]], schema.get("type"), f"{path}/const")
        elif "enum" in schema:
            self._only(schema, keys, {"enum", "type"}, path)
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ConstraintError(f"{path}/enum: must be a non-empty list")
            self._typed_values(values, schema.get("type"), f"{path}/enum")
        else:
            self._typed(schema, keys, path)

    def _typed(self, schema: Mapping[str, Any], keys: set[str], path: str) -> None:
        kind = schema.get("type")
        if kind is None and ("properties" in schema or "additionalProperties" in schema):
            kind = "object"
        if kind == "object":
            self._object(schema, keys, path)
        elif kind == "array":
            self._only(schema, keys, {"type", "items", "minItems", "maxItems"}, path)
            if "items" not in schema and keys & {"minItems", "maxItems"}:
                raise ConstraintError(f"{path}: minItems/maxItems need an 'items' schema")
            if "items" in schema:
                self.check(schema["items"], f"{path}/items")
            self._bounds(schema, "minItems", "maxItems", path)
        elif kind == "string":
            if "format" in schema:
                self._only(schema, keys, {"type", "format"}, path)
                if schema["format"] not in STRING_FORMATS:
                    raise ConstraintError(f"{path}/format: {schema['format']!r} is not supported "
                                          f"(supported: {sorted(STRING_FORMATS)})")
            else:
                self._only(schema, keys, {"type", "minLength", "maxLength"}, path)
                self._bounds(schema, "minLength", "maxLength", path)
        elif kind in PRIMITIVES:
            self._only(schema, keys, {"type"}, path)
        elif kind is None and keys:
            raise ConstraintError(f"{path}/{sorted(keys)[0]}: not supported (see the README's "
                                  "supported subset)")
        elif kind is None:
            raise ConstraintError(f"{path}: a schema must say its 'type' (or use enum, const, "
                                  "anyOf or $ref)")
        else:
            raise ConstraintError(f"{path}/type: unknown type {kind!r}")

    def _object(self, schema: Mapping[str, Any], keys: set[str], path: str) -> None:
        self._only(schema, keys, {"type", "properties", "required", "additionalProperties"}, path)
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise ConstraintError(f"{path}/properties: must be an object")
        for name, sub in properties.items():
            self.check(sub, f"{path}/properties/{name}")
        required = schema.get("required", [])
        if not isinstance(required, list):
            raise ConstraintError(f"{path}/required: must be a list of property names")
        for name in required:
            if name not in properties:
                raise ConstraintError(f"{path}/required: {name!r} is required but not among "
                                      "the properties")
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            self.check(extra, f"{path}/additionalProperties")
        elif extra is not None and not isinstance(extra, bool):
            raise ConstraintError(f"{path}/additionalProperties: must be a boolean or a schema")

    def _only(self, schema: Mapping[str, Any], keys: set[str], allowed: set[str],
              path: str) -> None:
        extra = sorted(keys - allowed)
        if extra:
            raise ConstraintError(
                f"{path}/{extra[0]}: not supported together with "
                f"{', '.join(sorted(keys & allowed)) or 'this schema'} (the grammar would "
                "ignore it; see the README's supported subset)")

    def _each(self, alternatives: object, path: str, keyword: str) -> None:
        if not isinstance(alternatives, list) or not alternatives:
            raise ConstraintError(f"{path}: {keyword} must be a non-empty list")
        for i, sub in enumerate(alternatives):
            self.check(sub, f"{path}/{i}")

    def _resolve(self, ref: object, path: str) -> None:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise ConstraintError(f"{path}/$ref: only local references ('#/...') are supported")
        target: object = self.root
        for part in ref[2:].split("/"):
            if not isinstance(target, Mapping) or part not in target:
                raise ConstraintError(f"{path}/$ref: {ref!r} points at nothing")
            target = target[part]
        if not isinstance(target, Mapping):
            raise ConstraintError(f"{path}/$ref: {ref!r} is not a schema")

    @staticmethod
    def _bounds(schema: Mapping[str, Any], low_key: str, high_key: str, path: str) -> None:
        low, high = schema.get(low_key, 0), schema.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConstraintError(f"{path}/{key}: must be a non-negative integer")
            if value > MAX_REPEAT:
                raise ConstraintError(f"{path}/{key}: at most {MAX_REPEAT} is supported")
        if high is not None and high < low:
            raise ConstraintError(f"{path}/{high_key}: smaller than {low_key}")

    @staticmethod
    def _typed_values(values: list[Any], kind: object, path: str) -> None:
        if kind is None:
            return
        if not isinstance(kind, str) or kind not in _JSON_TYPES:
            raise ConstraintError(f"{path}: unknown type {kind!r} beside it")
        for value in values:
            ok = isinstance(value, _JSON_TYPES[kind]) and not (
                isinstance(value, bool) and kind in ("integer", "number"))
            if not ok:
                raise ConstraintError(f"{path}: {json.dumps(value)} is not of type {kind!r}")
