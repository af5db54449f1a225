"""`response_format` end to end: random weights plus a grammar must still give answers that
validate, every time, streamed or not, with images and uploads; what can't be enforced is a
400, never a free-text 200."""

from __future__ import annotations

import io
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from conftest import CONSTRAINED_MAX_TOKENS as MAX_TOKENS
from conftest import RunningServer
from helpers import data_url, image_message, photo_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

RECEIPT = {
    "type": "object",
    "properties": {
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "paid": {"type": "boolean"},
        "kind": {"const": "receipt"},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
        "note": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["currency", "paid", "kind", "flags", "note"],
    "additionalProperties": False,
}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                   "strict": True}}


@pytest.fixture
def client(constrained_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=constrained_server.api, api_key="unused", max_retries=0,
                         timeout=120)


def ask(client: openai.OpenAI, schema: dict, seed: int, **extra: object) -> dict:
    reply = client.chat.completions.create(
        model="m", messages=extra.pop("messages", [{"role": "user", "content": "Fill it in."}]),
        max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
        response_format=schema_format(schema), **extra)  # type: ignore[call-overload]
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    answer = json.loads(choice.message.content or "")
    jsonschema.validate(answer, schema)
    return {"answer": answer, "timings": reply.model_extra["timings"]}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_answers_validate_against_the_schema(client: openai.OpenAI, seed: int) -> None:
    result = ask(client, RECEIPT, seed)
    assert result["answer"]["kind"] == "receipt"
    timings = result["timings"]
    # The grammar was consulted on every token, and random weights are refused often.
    assert timings["grammar"] > 0 and timings["grammar_resamples"] > 0


def test_streamed_answer_validates(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Fill it in."}], stream=True,
        max_tokens=MAX_TOKENS, temperature=1.0, seed=7, response_format=schema_format(RECEIPT))
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(pieces)), RECEIPT)
    alone = ask(client, RECEIPT, seed=7)["answer"]
    assert json.loads("".join(pieces)) == alone  # same seed: the same document either way


def test_image_and_uploaded_file_answers_validate(client: openai.OpenAI) -> None:
    png = photo_bytes(300, 200, seed=5)
    inline = ask(client, RECEIPT, 11, messages=[image_message("Read the receipt.", data_url(png))])
    assert inline["timings"]["image_tokens"] > 0
    uploaded = client.files.create(file=("receipt.png", io.BytesIO(png)), purpose="vision")
    by_file = ask(client, RECEIPT, 11, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Read the receipt."},
        {"type": "file", "file": {"file_id": uploaded.id}}]}])
    assert by_file["answer"] == inline["answer"]


class Receipt(BaseModel):
    currency: Literal["EUR", "USD"]
    paid: bool


def test_sdk_parse_returns_the_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "Was it paid?"}], seed=3,
        max_tokens=MAX_TOKENS, temperature=1.0, response_format=Receipt)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Receipt), completion.choices[0].message.content


def test_json_object_mode_gives_an_object(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "JSON please"}], seed=seed,
            max_tokens=MAX_TOKENS, temperature=0.8, response_format={"type": "json_object"})
        if reply.choices[0].finish_reason == "stop":  # free strings may run to the cap
            assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
        else:
            assert reply.choices[0].message.content.startswith("{")  # type: ignore[union-attr]


@pytest.mark.parametrize(("response_format", "extra", "param", "says"), [
    (schema_format({"type": "no-such-type"}), {}, "response_format.json_schema.schema",
     "unknown type 'no-such-type'"),
    (schema_format({"type": "integer", "minimum": 1, "maximum": 5}), {},
     "response_format.json_schema.schema", "#/maximum"),
    (schema_format({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}}), {},
     "response_format.json_schema.schema", "#/properties/a/$ref"),
    ({"type": "yaml"}, {}, "response_format", "yaml"),
    ({"type": "json_object"}, {"ignore_eos": True}, "ignore_eos", "ignore_eos"),
])
def test_what_cannot_be_enforced_is_a_400(constrained_server: RunningServer, response_format: dict,
                                          extra: dict, param: str, says: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": response_format, **extra}
    response = httpx.post(f"{constrained_server.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert "Traceback" not in constrained_server.log()
    still = httpx.post(f"{constrained_server.api}/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert still.status_code == 200


def test_metrics_count_constrained_requests(constrained_server: RunningServer,
                                            client: openai.OpenAI) -> None:
    def counters() -> dict[str, float]:
        text = httpx.get(f"{constrained_server.url}/metrics", timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(("vlserve_constrained_requests_total{",
                                    "vlserve_grammar_resamples_total "))}

    before = counters()
    result = ask(client, RECEIPT, seed=21)
    after = counters()
    key = 'vlserve_constrained_requests_total{kind="json_schema"}'
    assert after[key] - before.get(key, 0.0) == 1
    resamples = "vlserve_grammar_resamples_total"
    assert after[resamples] - before[resamples] == result["timings"]["grammar_resamples"] > 0


# Schemas whose documents are all short (no free strings, fixed-size arrays): on random
# weights only the grammar can make each answer valid, and it always ends it in time.
_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.sampled_from(["a", "b", "cat", "dog", 1, 2.5, True]), min_size=1, max_size=4,
             unique=True).map(lambda values: {"enum": values}),
    st.sampled_from(["x", 3, False]).map(lambda value: {"const": value}),
    st.integers(0, 3).map(lambda n: {"type": "string", "maxLength": n}),
)
_schemas = st.recursive(_leaf, lambda inner: st.one_of(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False}),
    st.tuples(inner, st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1]}),
    st.lists(inner, min_size=2, max_size=2).map(lambda alts: {"anyOf": alts}),
), max_leaves=5)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas, seed=st.integers(0, 2**31 - 1))
def test_every_answer_validates(client: openai.OpenAI, schema: dict, seed: int) -> None:
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Answer."}], max_tokens=MAX_TOKENS,
        temperature=1.0, seed=seed, response_format=schema_format(schema))
    choice = reply.choices[0]
    # Every document these schemas allow is short, so the grammar always ends it in time.
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), schema)
