"""POST /tokenize and /detokenize: on the real Gemma vocabulary (262k tokens, SentencePiece,
control tokens), the count is what chat and text completions report as prompt tokens; on
the demo vision model, images count as the positions they take."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import RunningServer
from helpers import data_url, image_message, photo_bytes
from test_faults import in_process_engine
from test_real_model import FRANCE, client, gemma, gemma_gguf  # noqa: F401  (the Gemma server)

import server.api.tool_calls
from server.demo_model import DemoModelPaths
from server.engine.tools import tools_grammar

pytestmark = pytest.mark.slow

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def tokenize(server: RunningServer, **body: object) -> dict:
    answer = httpx.post(f"{server.api}/tokenize", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_prompt_counts_as_its_completion_does(gemma: RunningServer,  # noqa: F811
                                                client: openai.OpenAI) -> None:  # noqa: F811
    prompt = "The capital of France is"
    counted = tokenize(gemma, prompt=prompt, return_token_strs=True)
    completion = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=1)
    assert completion.usage is not None
    assert counted["count"] == completion.usage.prompt_tokens == len(counted["tokens"])
    assert counted["image_tokens"] == 0 and counted["max_model_len"] > counted["count"]
    # The vocabulary's own pieces: BOS written out, then SentencePiece's words.
    assert counted["token_strs"][0] == "<bos>"
    assert "".join(counted["token_strs"][1:]).replace("▁", " ") == prompt
    bare = tokenize(gemma, prompt=prompt, add_special_tokens=False)
    assert bare["tokens"] == counted["tokens"][1:]
    assert "token_strs" in bare and bare["token_strs"] is None

    # A control token's text in a prompt is that one token, as /completions reads it.
    turn = tokenize(gemma, prompt="<start_of_turn>user", add_special_tokens=False)
    assert len(turn["tokens"]) == 2
    back = httpx.post(f"{gemma.api}/detokenize", json={"tokens": turn["tokens"]}, timeout=30)
    assert back.status_code == 200 and back.json() == {"prompt": "<start_of_turn>user"}
    # The ids are the ones logit_bias speaks in: banning the prompt's next word's first
    # token changes the greedy continuation.
    first = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=1,
                                      temperature=0).choices[0].text
    (banned,) = tokenize(gemma, prompt=first, add_special_tokens=False)["tokens"][:1]
    other = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=1,
                                      temperature=0, logit_bias={str(banned): -100})
    assert other.choices[0].text != first


def test_a_chat_counts_as_the_chat_completion_does(gemma: RunningServer,  # noqa: F811
                                                   client: openai.OpenAI) -> None:  # noqa: F811
    def counted_as_chat(**extra: object) -> dict:
        counted = tokenize(gemma, messages=FRANCE, **extra)
        chat = client.chat.completions.create(model="gemma-3-270m", messages=FRANCE,
                                              max_tokens=1, **extra)  # type: ignore[arg-type]
        assert chat.usage is not None and counted["count"] == chat.usage.prompt_tokens
        return counted

    def as_read(counted: dict) -> str:
        return httpx.post(f"{gemma.api}/detokenize", json={"tokens": counted["tokens"]},
                          timeout=30).json()["prompt"]

    legacy = {"functions": [tool["function"] for tool in WEATHER]}
    for extra in ({}, {"tools": WEATHER}, legacy, {"tools": WEATHER, "tool_choice": "required"},
                  {"tools": WEATHER, "tool_choice": {"type": "function",
                                                     "function": {"name": "get_weather"}}}):
        counted = counted_as_chat(**extra)
    # The template's markup, the question and the generation prompt, as the model reads it.
    text = as_read(counted)
    assert "What is the capital of France?" in text and "get_weather" in text
    assert text.startswith("<bos>") and text.endswith("ASSISTANT:")  # the preset's template
    assert counted["count"] > tokenize(gemma, messages=FRANCE)["count"]  # the tool prompt
    # Beside tools, a JSON format's schema is shown in the tool prompt: counted alike.
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"], "additionalProperties": False}
    shaped = {"tools": WEATHER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": schema, "strict": True}}}
    counted = counted_as_chat(**shaped)
    text = as_read(counted)
    assert json.dumps(schema) in text and "answer in text" not in text
    assert counted["count"] > tokenize(gemma, messages=FRANCE, tools=WEATHER)["count"]


def test_the_root_paths_answer_as_vllm_serves_them(gemma: RunningServer) -> None:  # noqa: F811
    answer = httpx.post(f"{gemma.url}/tokenize", json={"prompt": "Hello"}, timeout=30)
    assert answer.status_code == 200 and answer.json()["count"] == 2  # <bos> Hello
    back = httpx.post(f"{gemma.url}/detokenize", json={"tokens": answer.json()["tokens"]},
                      timeout=30)
    assert back.json() == {"prompt": "<bos>Hello"}


@pytest.mark.parametrize(("path", "body", "param"), [
    ("tokenize", {}, "prompt"),
    ("tokenize", {"prompt": "a", "messages": FRANCE}, "prompt"),
    ("tokenize", {"prompt": "a", "tools": WEATHER}, "tools"),
    ("tokenize", {"messages": FRANCE, "tool_choice": "required"}, "tool_choice"),
    ("tokenize", {"messages": FRANCE, "chat_template_kwargs": {"tools": 1}},
     "chat_template_kwargs.tools"),
    ("detokenize", {"tokens": [1, 262144]}, "tokens.1"),
    ("detokenize", {"tokens": [-1]}, "tokens.0"),
])
def test_bad_requests_name_the_field(gemma: RunningServer, path: str,  # noqa: F811
                                     body: dict, param: str) -> None:
    answer = httpx.post(f"{gemma.api}/{path}", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert httpx.get(f"{gemma.url}/health", timeout=10).status_code == 200


def test_images_count_as_the_positions_they_take(server: RunningServer) -> None:
    # An image of its own: a shared one would be in the embedding cache for later tests.
    messages = [image_message("What is in this picture?", data_url(photo_bytes(seed=4242)))]
    counted = tokenize(server, messages=messages)
    assert counted["image_tokens"] > 0
    assert counted["count"] == len(counted["tokens"]) + counted["image_tokens"]
    chat = httpx.post(f"{server.api}/chat/completions", timeout=60, json={
        "model": server.model_name, "messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == counted["count"]
    assert chat["timings"]["image_tokens"] == counted["image_tokens"]
    text_only = tokenize(server, messages=[{"role": "user",
                                            "content": "What is in this picture?"}])
    assert text_only["image_tokens"] == 0 and text_only["count"] < counted["count"]
    # A prompt longer than the context is still counted (the client compares it with
    # max_model_len); a chat completion of it is a 400 naming the sizes.
    long = "word " * (counted["max_model_len"] + 50)
    over = tokenize(server, prompt=long)
    assert over["count"] > over["max_model_len"]
    refused = httpx.post(f"{server.api}/completions", timeout=60, json={
        "model": server.model_name, "prompt": long, "max_tokens": 1})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"


def test_the_media_marker_in_a_raw_prompt_is_text(gemma: RunningServer,  # noqa: F811
                                                  server: RunningServer) -> None:
    """mtmd's image marker spelled in a raw prompt is text, not an image slot (it hung the
    request: a slot with no image to fill it)."""
    prompt = "See <__media__> here."
    for running in (gemma, server):
        counted = tokenize(running, prompt=prompt, return_token_strs=True)
        assert counted["image_tokens"] == 0
        assert "".join(counted["token_strs"]).replace("▁", " ").endswith(prompt)
        answer = httpx.post(f"{running.api}/completions", timeout=30, json={
            "prompt": prompt, "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] == counted["count"]


def test_a_chat_with_tools_is_counted_without_building_its_grammar(
        demo_model: DemoModelPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count needs the tool prompt, not the grammar a chat's answer must match (tens of
    milliseconds for a few large schemas): /tokenize builds none, and counts as the chat
    that does; a schema no grammar could enforce is still the chat's 400."""
    built: list[str] = []

    def counted_grammar(*args: object, **kwargs: object) -> str:
        built.append("grammar")
        return tools_grammar(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(server.api.tool_calls, "tools_grammar", counted_grammar)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}]

    async def ask(app: object) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     timeout=120) as c:
            answers = []
            for extra in ({"tools": WEATHER}, {"tools": WEATHER, "tool_choice": "required"},
                          {"tools": bad}):
                answers.append(await c.post("/api/v1/tokenize",
                                            json={"messages": FRANCE, **extra}))
            assert not built
            answers.append(await c.post("/api/v1/chat/completions", json={
                "messages": FRANCE, "tools": WEATHER, "max_tokens": 1}))
            answers.append(await c.post("/api/v1/chat/completions", json={
                "messages": FRANCE, "tools": bad, "max_tokens": 1}))
            return answers

    with in_process_engine(demo_model) as (app, _, _):
        auto, required, refused, chat, chat_refused = asyncio.run(ask(app))
    assert len(built) == 2  # the chats' own
    assert auto.status_code == required.status_code == chat.status_code == 200, auto.text
    assert auto.json()["count"] == chat.json()["usage"]["prompt_tokens"]
    assert required.json()["count"] != auto.json()["count"]  # "You must call one of them."
    assert refused.status_code == chat_refused.status_code == 400
    assert refused.json()["error"] == chat_refused.json()["error"]
    assert refused.json()["error"]["code"] == "unsupported_schema"
