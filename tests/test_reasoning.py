"""Thinking models: the reasoning comes back as `reasoning_content` beside the answer's
`content` (llama-server's and vLLM's field), streamed as `delta.reasoning_content`, and
`chat_template_kwargs` (e.g. `enable_thinking: false`) reach the chat template. The real
engine and HTTP stack with the openai SDK; the demo model served with a Qwen3-style template
whose generation prompt opens the think block unless thinking is off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseOutputMessage, ResponseReasoningItem
from playwright.sync_api import Page, expect
from test_playground import STREAM_TIMEOUT_MS, browser, chat_bodies, page  # noqa: F401

from server.demo_model import DemoModelPaths

THINKING_TEMPLATE = """\
{%- if reasoning_effort is defined -%}<|im_start|>system
Reasoning: {{ reasoning_effort }}<|im_end|>
{% endif -%}
{%- for m in messages -%}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% else %}<think>
{% endif %}{%- endif -%}
"""
ASK = [{"role": "user", "content": "Is the sky blue?"}]


def serve(demo_model: DemoModelPaths, folder: Path, **env: str) -> RunningServer:
    template = folder / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    return start_server(demo_model, folder / "server.log",
                        env={"VLSERVE_CHAT_TEMPLATE": str(template), **env})


@pytest.fixture(scope="module")
def server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningServer]:
    running = serve(demo_model, tmp_path_factory.mktemp("thinking"))
    yield running
    stop_server(running)


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, **extra: object) -> ChatCompletion:
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=ASK, max_tokens=12, temperature=0, **extra)  # type: ignore[arg-type]
    return ChatCompletion.model_validate_json(raw.text)


def reasoning_of(message: object) -> str | None:
    extra = getattr(message, "model_extra", None) or {}
    return extra.get("reasoning_content")


def test_the_opened_think_block_is_reasoning_not_content(client: openai.OpenAI) -> None:
    answer = ask(client)
    message = answer.choices[0].message
    # The template opened <think>; the model (random weights) never closed it: every word
    # it wrote is reasoning, none is answer.
    assert reasoning_of(message), message
    assert message.content == ""
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == \
        answer.usage.completion_tokens > 0

    streamed = list(client.chat.completions.create(
        model="m", messages=ASK, max_tokens=12, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True}))
    pieces = [(reasoning_of(c.choices[0].delta), c.choices[0].delta.content)
              for c in streamed if c.choices]
    assert "".join(r for r, _ in pieces if r) == reasoning_of(message)
    assert "".join(c for _, c in pieces if c) == ""
    usage = streamed[-1].usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens


def test_enable_thinking_false_reaches_the_template(client: openai.OpenAI) -> None:
    thinking = ask(client)
    plain = ask(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # The template closed an empty think block in the prompt: more prompt tokens, and the
    # model's words are the answer.
    assert thinking.usage is not None and plain.usage is not None
    assert plain.usage.prompt_tokens > thinking.usage.prompt_tokens
    assert plain.choices[0].message.content
    assert reasoning_of(plain.choices[0].message) is None
    assert plain.usage.completion_tokens_details is not None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


def test_reasoning_effort_reaches_the_templates_switches(client: openai.OpenAI,
                                                         server: RunningServer) -> None:
    thinking = ask(client)
    # "none" is the template's enable_thinking: false (and its reasoning_effort), as if the
    # client had sent both.
    off = ask(client, reasoning_effort="none")
    plain = ask(client, extra_body={"chat_template_kwargs": {
        "enable_thinking": False, "reasoning_effort": "none"}})
    assert off.usage is not None and plain.usage is not None and thinking.usage is not None
    assert off.usage.prompt_tokens == plain.usage.prompt_tokens > thinking.usage.prompt_tokens
    assert reasoning_of(off.choices[0].message) is None and off.choices[0].message.content
    # A template that reads reasoning_effort gets it (its system line), still thinking.
    high = ask(client, reasoning_effort="high")
    assert high.usage is not None and high.usage.prompt_tokens > thinking.usage.prompt_tokens
    assert reasoning_of(high.choices[0].message)
    text = httpx.post(f"{server.api}/detokenize", timeout=30, json={"tokens": httpx.post(
        f"{server.api}/tokenize", timeout=30, json={"messages": ASK, "reasoning_effort": "high"}
    ).json()["tokens"]}).json()["prompt"]
    assert "Reasoning: high" in text and text.endswith("<think>\n")
    # The client's own template variables win.
    own = ask(client, reasoning_effort="none",
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert reasoning_of(own.choices[0].message)
    # The Responses API's reasoning.effort is the same switch.
    response = client.responses.create(model="m", input=ASK[0]["content"], temperature=0,
                                       max_output_tokens=12, reasoning={"effort": "none"})
    assert [item.type for item in response.output] == ["message"] and response.output_text
    assert response.reasoning is not None and response.reasoning.effort == "none"


def test_bad_template_kwargs_are_a_400(server: RunningServer) -> None:
    for extra, param in (({"chat_template_kwargs": {"messages": []}},
                          "chat_template_kwargs.messages"),
                         ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
                         ({"reasoning_effort": "extreme"}, "reasoning_effort")):
        body = {"model": "m", "messages": ASK, "max_tokens": 2, **extra}
        answer = httpx.post(f"{server.api}/chat/completions", json=body, timeout=30)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param, answer.text
    answer = httpx.post(f"{server.api}/responses", timeout=30, json={
        "model": "m", "input": "Hi", "reasoning": {"effort": "extreme"}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "reasoning.effort"


def test_reasoning_format_none_leaves_the_text_as_the_model_wrote_it(
        demo_model: DemoModelPaths, tmp_path: Path, client: openai.OpenAI) -> None:
    split = ask(client).choices[0].message
    plain = serve(demo_model, tmp_path, VLSERVE_REASONING_FORMAT="none")
    try:
        same = ask(openai.OpenAI(base_url=plain.api, api_key="unused", max_retries=0))
    finally:
        stop_server(plain)
    assert reasoning_of(same.choices[0].message) is None
    assert same.choices[0].message.content == reasoning_of(split)


def test_the_playground_shows_the_reasoning_apart_and_sends_back_the_answer_only(
        page: Page, server: RunningServer, client: openai.OpenAI) -> None:  # noqa: F811
    reasoning = reasoning_of(ask(client).choices[0].message)
    bodies = chat_bodies(page)
    page.goto(f"{server.url}/playground")
    page.fill("#max-tokens", "12")
    page.locator("#temperature").evaluate(
        "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    page.fill("#prompt", ASK[0]["content"])
    page.click("#send")
    expect(page.locator(".timing").last).to_be_visible(timeout=STREAM_TIMEOUT_MS)
    expect(page.locator(".msg.assistant .thinking").last).to_have_text(reasoning or "?")
    expect(page.locator(".msg.assistant .text").last).to_have_text("")
    page.fill("#prompt", "And the sea?")
    page.click("#send")
    expect(page.locator(".timing")).to_have_count(2, timeout=STREAM_TIMEOUT_MS)
    assert bodies[-1]["messages"][-2] == {"role": "assistant", "content": ""}


def test_responses_give_the_reasoning_its_own_item(client: openai.OpenAI,
                                                   server: RunningServer) -> None:
    reasoning = reasoning_of(ask(client).choices[0].message)
    raw = httpx.post(f"{server.api}/responses", timeout=60, json={
        "model": "m", "input": ASK[0]["content"], "max_output_tokens": 12, "temperature": 0})
    assert raw.status_code == 200, raw.text
    response = Response.model_validate(raw.json())
    thought, message = response.output
    assert isinstance(thought, ResponseReasoningItem) and thought.content is not None
    assert thought.content[0].text == reasoning
    assert isinstance(message, ResponseOutputMessage)
    assert response.output_text == ""
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == \
        response.usage.output_tokens > 0

    events = list(client.responses.create(model="m", input=ASK[0]["content"],
                                          max_output_tokens=12, temperature=0, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    done = [e for e in events if e.type == "response.reasoning_text.done"]
    assert deltas == reasoning and [e.text for e in done] == [reasoning]
    final = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in final.output] == ["reasoning", "message"]
    # Cut by max_output_tokens mid-thought: streamed or not, the reasoning is incomplete.
    assert final.output[0].status == thought.status == "incomplete"

    # Apps send the output back as input (context they manage) or name the response: the
    # reasoning item is taken, not refused.
    again = client.responses.create(model="m", max_output_tokens=4, input=[
        *[item.model_dump(exclude_none=True) for item in response.output],
        {"role": "user", "content": "Why?"}])  # type: ignore[list-item]
    assert again.status in ("completed", "incomplete")
    follow = client.responses.create(model="m", previous_response_id=response.id,
                                     input="Why?", max_output_tokens=4)
    assert follow.status in ("completed", "incomplete")
