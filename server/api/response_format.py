"""`response_format` → the grammar the answer must match, or a 400 naming what can't be
enforced (server/engine/constraints.py says which schemas can)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from server.api.errors import APIError
from server.api.protocol import JSONObjectFormat, JSONSchemaResponseFormat, ResponseFormat
from server.engine.constraints import ConstraintError, json_object_grammar, schema_grammar

_PARAM = "response_format.json_schema.schema"


async def response_grammar(response_format: ResponseFormat | None, param: str = _PARAM
                           ) -> tuple[str, str] | None:
    """(kind, GBNF grammar) for a constrained answer, None for free text; `param` names the
    schema in errors (responses carry it at text.format.schema)."""
    if isinstance(response_format, JSONObjectFormat):
        return "json_object", json_object_grammar()
    if not isinstance(response_format, JSONSchemaResponseFormat):
        return None
    schema = response_format.json_schema.schema_
    if schema is None:  # OpenAI: a named format without a schema is any JSON object
        return "json_object", json_object_grammar()
    try:
        # Off the event loop: a large schema unrolls into a large grammar.
        return "json_schema", await asyncio.to_thread(schema_grammar, schema)
    except ConstraintError as exc:
        raise APIError(400, f"{param}: {exc}", param=param,
                       code="unsupported_schema") from None


def answer_schema(response_format: ResponseFormat | None) -> Mapping[str, Any] | None:
    """The JSON schema a JSON response format holds the answer to (`json_object`, or a named
    format without a schema: any object), None for free text."""
    if isinstance(response_format, JSONObjectFormat):
        return {"type": "object"}
    if isinstance(response_format, JSONSchemaResponseFormat):
        schema = response_format.json_schema.schema_
        return {"type": "object"} if schema is None else schema
    return None
