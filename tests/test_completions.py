"""POST /completions (OpenAI's legacy text completions) on the real Gemma 3 270M base GGUF,
a model that continues text: the prompt as written (no chat template), the client's stop
strings, logprobs, echo, streaming, with the openai SDK and its types."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server
from openai.types import Completion, CompletionChoice
from test_batches import jsonl, read_lines, wait_batch
from test_real_model import client, gemma, gemma_gguf  # noqa: F401  (the real-model server)

PROMPT = "The capital of France is"


def complete(client: openai.OpenAI, **extra: object) -> Completion:  # noqa: F811
    raw = client.completions.with_raw_response.create(
        model="gemma-3-270m", prompt=extra.pop("prompt", PROMPT),  # type: ignore[arg-type]
        max_tokens=extra.pop("max_tokens", 16), temperature=extra.pop("temperature", 0),
        **extra)  # type: ignore[arg-type]
    return Completion.model_validate_json(raw.text)


def test_the_prompt_is_continued_as_written(client: openai.OpenAI) -> None:  # noqa: F811
    answer = complete(client)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
    (choice,) = answer.choices
    assert choice.text.strip() and choice.finish_reason == "length"
    # The text goes on from the prompt's: its first word keeps the space SentencePiece
    # marks it with (a chat answer's first space is dropped, a continuation's is not).
    assert choice.text.startswith(" ") and not choice.text.startswith("  ")
    timings = (answer.model_extra or {})["timings"]  # the chat path's stages, filled
    assert timings["prompt_eval"] > 0 and timings["generation"] > 0
    assert timings["first_token"] > 0 and timings["total"] >= timings["first_token"]
    assert answer.usage is not None and answer.usage.completion_tokens == 16
    # No chat template around it: the prompt is BOS and its own six tokens.
    assert answer.usage.prompt_tokens <= 8
    chat = client.chat.completions.create(model="gemma-3-270m", max_tokens=1,
                                          messages=[{"role": "user", "content": PROMPT}])
    assert chat.usage is not None and chat.usage.prompt_tokens > answer.usage.prompt_tokens

    # The chat template's stop strings are the chat's: a raw dialogue runs past "\nUSER:"
    # (where the Gemma preset's chat answers end).
    dialogue = "USER: Hello!\nASSISTANT: Hi, how can I help?\nUSER: What is 2+2?\nASSISTANT:"
    assert "\nUSER:" in complete(client, prompt=dialogue, max_tokens=48).choices[0].text

    # Special-token texts in a raw prompt are the client's own markup: one token each.
    turn = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    marked = complete(client, prompt=turn, max_tokens=1)
    assert marked.usage is not None and marked.usage.prompt_tokens <= 10


def test_stop_logprobs_echo_and_streaming(client: openai.OpenAI) -> None:  # noqa: F811
    text = complete(client, max_tokens=24).choices[0].text
    stop = text[6:9]
    cut = complete(client, max_tokens=24, stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (text[:text.index(stop)], "stop")

    with_lp = complete(client, logprobs=2).choices[0]
    lp = with_lp.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens).lstrip() == with_lp.text.lstrip()
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 16
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    echoed = complete(client, echo=True).choices[0].text
    assert echoed.startswith(PROMPT) and echoed[len(PROMPT):] == complete(client).choices[0].text

    chunks = list(client.completions.create(model="gemma-3-270m", prompt=PROMPT,
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == \
        complete(client).choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16

    two = complete(client, n=2, temperature=0.9, seed=3)
    assert [c.index for c in two.choices] == [0, 1]


def test_several_prompts_and_token_ids(client: openai.OpenAI,  # noqa: F811
                                       gemma: RunningServer) -> None:  # noqa: F811
    """OpenAI's other prompt forms (evaluation tools send batches of token-id prompts):
    each prompt answers as it would alone, choices in prompt order."""
    italy = "The capital of Italy is"
    alone = [complete(client, prompt=p, max_tokens=8) for p in (PROMPT, italy)]
    both = complete(client, prompt=[PROMPT, italy], max_tokens=8)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage is not None and all(a.usage for a in alone)
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)  # type: ignore[union-attr]
    assert both.usage.completion_tokens == 16

    ids = httpx.post(f"{gemma.api}/tokenize", json={"prompt": PROMPT}, timeout=30
                     ).json()["tokens"]
    by_ids = complete(client, prompt=ids, max_tokens=8, echo=True)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    # The ids as they are (BOS included), echoed as the model reads them (BOS shows no
    # text, as in logprobs.tokens).
    assert by_ids.choices[0].text == PROMPT + alone[0].choices[0].text
    two_by_ids = complete(client, prompt=[ids, ids[1:]], max_tokens=8, n=2, temperature=0)
    assert [c.index for c in two_by_ids.choices] == [0, 1, 2, 3]
    assert {c.text for c in two_by_ids.choices[:2]} == {alone[0].choices[0].text}

    chunks = list(client.completions.create(model="gemma-3-270m", prompt=[PROMPT, italy],
                                            max_tokens=8, temperature=0, stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in both.choices]


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI,  # noqa: F811
                                              gemma: RunningServer) -> None:  # noqa: F811
    """What evaluation tools ask (lm-eval's loglikelihood: echo, logprobs, max_tokens 1):
    the log-probability of every prompt token given the ones before it."""
    ids = httpx.post(f"{gemma.api}/tokenize", json={"prompt": PROMPT}, timeout=30
                     ).json()["tokens"]
    n = len(ids)

    def scored(prompt: str, top: int) -> CompletionChoice:
        """The prompt's first token has null logprobs, as OpenAI's legacy API answers (the
        SDK's type says float there): validated field by field, not as a whole."""
        raw = httpx.post(f"{gemma.api}/completions", timeout=60, json={
            "prompt": prompt, "echo": True, "logprobs": top, "max_tokens": 1,
            "temperature": 0}).json()
        (choice,) = raw["choices"]
        first = {k: v.pop(0) for k, v in choice["logprobs"].items()}
        assert first["token_logprobs"] is None and first["top_logprobs"] is None
        assert first["text_offset"] == 0
        return CompletionChoice.model_validate(choice)

    one = scored(PROMPT, 2)
    lp = one.logprobs
    # After the first (BOS, no text): every other prompt token, then the generated one.
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens[:n - 1]) == PROMPT and one.text.startswith(PROMPT)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[n - 1] == len(PROMPT)
    # Teacher forcing agrees with generation: the prompt's tokens that the model itself
    # wrote score as they did when it wrote them (to a batch's rounding: evaluated 1 or
    # 10 tokens at a time, Q4_K's kernels differ by up to ~0.13 here).
    written = complete(client, logprobs=0, max_tokens=4).choices[0]
    assert written.logprobs is not None
    forced = scored(PROMPT + written.text, 0).logprobs
    assert forced is not None and forced.tokens and forced.token_logprobs
    assert forced.tokens[n - 1:n + 3] == written.logprobs.tokens
    assert forced.token_logprobs[n - 1:n + 3] == pytest.approx(
        written.logprobs.token_logprobs, abs=0.25)
    # Characters split over byte tokens: offsets count each once, as the echoed text does.
    odd = "Tokyo ꙮ 東京 is"  # ꙮ: three byte tokens in this vocabulary
    split = scored(odd, 0).logprobs
    assert split is not None and split.text_offset
    assert split.text_offset == sorted(split.text_offset) and split.text_offset[-1] == len(odd)
    assert split.tokens[-2] == " is" and split.text_offset[-2] == len(odd) - len(" is")
    # A real model knows its capitals: Paris scores far above a banana.
    paris = scored(PROMPT + " Paris", 0).logprobs
    banana = scored(PROMPT + " banana", 0).logprobs
    assert paris and paris.token_logprobs and banana and banana.token_logprobs
    assert paris.token_logprobs[n - 1] > banana.token_logprobs[n - 1] + 3
    # The slot's cached prefix is no excuse to skip scoring it: asked again, the same.
    again = scored(PROMPT, 2).logprobs
    assert again is not None and again.token_logprobs == pytest.approx(lp.token_logprobs)
    # Several prompts, several choices each: every choice carries its own prompt's scores
    # (the choices after the first start from a copy of its evaluated prompt).
    many = httpx.post(f"{gemma.api}/completions", timeout=60, json={
        "prompt": [PROMPT, PROMPT + " Paris"], "n": 2, "echo": True, "logprobs": 0,
        "max_tokens": 1, "temperature": 1.0, "seed": 5}).json()["choices"]
    prompt_parts = [c["logprobs"]["token_logprobs"][:n + (c["index"] // 2)] for c in many]
    assert prompt_parts[0] == pytest.approx([None, *lp.token_logprobs[:n - 1]])
    assert prompt_parts[1] == prompt_parts[0] and prompt_parts[3] == prompt_parts[2]
    assert prompt_parts[2][n] == pytest.approx(paris.token_logprobs[n - 1])



def _scored_echo(running: RunningServer, prompt: str | list[int]) -> tuple[dict, int]:
    """A greedy echo with logprobs (raw JSON: the first token's logprobs are null), and how
    many tokens the model read the prompt as."""
    ids = prompt if isinstance(prompt, list) else httpx.post(
        f"{running.api}/tokenize", json={"prompt": prompt}, timeout=30).json()["tokens"]
    answer = httpx.post(f"{running.api}/completions", timeout=60, json={
        "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0})
    assert answer.status_code == 200, answer.text
    (choice,) = answer.json()["choices"]
    return choice, len(ids)


def _assert_tokens_spell_the_text(choice: dict, n_prompt: int, echo: str) -> None:
    """OpenAI's promise: the prompt's tokens join to the echo, each found at its offset;
    one entry per prompt token, then the generated ones from the end of the echo on."""
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith(echo)
    assert len(lp["tokens"]) == n_prompt + 3
    assert "".join(lp["tokens"][:n_prompt]) == echo
    assert all(text[at:].startswith(token) for token, at in
               zip(lp["tokens"][:n_prompt], lp["text_offset"][:n_prompt], strict=True))
    assert lp["text_offset"][n_prompt] == len(echo)


def test_echoed_tokens_spell_the_echoed_text(llava_server: RunningServer,
                                             gemma: RunningServer) -> None:  # noqa: F811
    """A vocab that puts a space before the text it reads (the LLaVA demo model's, Llama's
    SentencePiece) reads "Hello" as " Hello": that space is the tokenizer's, so the token's
    text leaves it out and the tokens join to the prompt as the client wrote it. Special
    tokens in a raw prompt show the text the client wrote; token ids echo the text their
    tokens join to. Gemma's vocab adds no space: the same holds there."""
    llava = llava_server
    for prompt in ("Hello world", " Hello world", "Hi</s>There was"):
        choice, n_prompt = _scored_echo(llava, prompt)
        _assert_tokens_spell_the_text(choice, n_prompt, prompt)
    (bos, *ids) = httpx.post(f"{llava.api}/tokenize", json={"prompt": "Hello world"},
                             timeout=30).json()["tokens"]
    for prompt_ids in ([bos, *ids], ids):  # with the BOS or without: the same text
        choice, n_prompt = _scored_echo(llava, prompt_ids)
        _assert_tokens_spell_the_text(choice, n_prompt, "Hello world")
    # The same ids echo the same text without logprobs.
    plain = httpx.post(f"{llava.api}/completions", timeout=60, json={
        "prompt": [bos, *ids], "echo": True, "max_tokens": 1}).json()["choices"][0]["text"]
    assert plain.startswith("Hello world") and not plain.startswith(" ")
    for prompt in (PROMPT, "<start_of_turn>user\nHi<end_of_turn>\n"):
        choice, n_prompt = _scored_echo(gemma, prompt)
        _assert_tokens_spell_the_text(choice, n_prompt, prompt)


LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


def _streamed(running: RunningServer, body: dict) -> tuple[dict[int, dict], list[dict]]:
    """Each choice as its chunks add up (text, finish_reason, logprobs' lists joined), and
    the chunks themselves."""
    with httpx.stream("POST", f"{running.api}/completions", timeout=60,
                      json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    choices: dict[int, dict] = {}
    for chunk in chunks:
        for part in chunk["choices"]:
            into = choices.setdefault(part["index"], {
                "text": "", "finish_reason": None, "logprobs": {k: [] for k in LOGPROBS}})
            into["text"] += part["text"]
            into["finish_reason"] = part["finish_reason"] or into["finish_reason"]
            for key in LOGPROBS if part["logprobs"] else ():
                into["logprobs"][key] += part["logprobs"][key]
    return choices, chunks


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(
        gemma: RunningServer) -> None:  # noqa: F811
    """OpenAI's legacy completions allow max_tokens 0: with echo and logprobs, the prompt's
    scores alone (how evaluation harnesses measure a text's likelihood), nothing sampled.
    The scores are those of the same prompt answered with one token."""
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "temperature": 0}
    scored = httpx.post(f"{gemma.api}/completions", timeout=60,
                        json={**body, "max_tokens": 0}).json()
    one = httpx.post(f"{gemma.api}/completions", timeout=60,
                     json={**body, "max_tokens": 1}).json()
    (choice,) = scored["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert scored["usage"]["completion_tokens"] == 0
    assert scored["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    lp, with_one = choice["logprobs"], one["choices"][0]["logprobs"]
    assert lp["tokens"] == with_one["tokens"][:-1] and "".join(lp["tokens"]) == PROMPT
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(with_one["token_logprobs"][1:-1],
                                                     abs=1e-4)
    # Streamed, and for several prompts and choices: each choice is its echo, then its end.
    streamed, _ = _streamed(gemma, {**body, "max_tokens": 0, "n": 2,
                                    "prompt": [PROMPT, "The capital of Italy is"]})
    assert [streamed[i]["text"] for i in range(4)] == [PROMPT, PROMPT, "The capital of "
                                                       "Italy is", "The capital of Italy is"]
    assert {streamed[i]["finish_reason"] for i in range(4)} == {"length"}
    plain = httpx.post(f"{gemma.api}/completions", timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 0}).json()  # no echo: empty
    assert plain["choices"][0]["text"] == "" and plain["usage"]["completion_tokens"] == 0
    refused = httpx.post(f"{gemma.api}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
    assert refused.status_code == 400  # a chat answer of nothing is no answer


def test_echo_with_logprobs_streams(llava_server: RunningServer,
                                    gemma: RunningServer) -> None:  # noqa: F811
    """Streamed, a scored prompt's echo comes first with its prompt's logprobs (they are
    known once the prompt is evaluated), then the generated tokens with offsets after it:
    the chunks add up to the whole answer, for every choice of every prompt."""
    italy = "The capital of Italy is"
    for running, body in (
            (gemma, {"prompt": PROMPT, "logprobs": 2, "max_tokens": 5}),
            (gemma, {"prompt": [PROMPT, italy], "n": 2, "logprobs": 1, "max_tokens": 4,
                     "stream_options": {"include_usage": True}}),
            (llava_server, {"prompt": "Hello world", "logprobs": 1, "max_tokens": 4})):
        body = {**body, "echo": True, "temperature": 0}
        whole = httpx.post(f"{running.api}/completions", json=body, timeout=60).json()
        streamed, chunks = _streamed(running, body)
        assert sorted(streamed) == [c["index"] for c in whole["choices"]]
        for choice in whole["choices"]:
            got = streamed[choice["index"]]
            assert (got["text"], got["finish_reason"]) == (choice["text"],
                                                           choice["finish_reason"])
            _same_logprobs(got["logprobs"], choice["logprobs"])
        # Each choice's first chunk: its prompt echoed, with every prompt token scored.
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        n = body.get("n", 1)
        firsts = {}
        for chunk in chunks:
            for part in chunk["choices"]:
                firsts.setdefault(part["index"], part)
        for index, first in firsts.items():
            assert first["text"] == prompts[index // n]
            assert first["logprobs"]["token_logprobs"][0] is None
            assert "".join(first["logprobs"]["tokens"]) == first["text"]
        if "stream_options" in body:
            assert chunks[-1]["choices"] == []
            assert chunks[-1]["usage"] == whole["usage"]


def _same_logprobs(got: dict, want: dict) -> None:
    """Two requests' logprobs: the same tokens at the same offsets, the numbers equal up to
    float noise (how prompts share a step's batch, and prefix reuse, move the last digits)."""
    assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
    assert got["token_logprobs"] == [None if v is None else pytest.approx(v, abs=1e-4)
                                     for v in want["token_logprobs"]]
    assert got["top_logprobs"] == [None if top is None else {
        k: pytest.approx(v, abs=1e-4) for k, v in top.items()} for top in want["top_logprobs"]]


def test_a_scored_prompt_leaves_a_conversations_cache_alone(
        gemma_gguf: Path, tmp_path: Path) -> None:  # noqa: F811
    """A scored prompt evaluates everything itself: it must not take (and wipe) the slot
    that holds a conversation it happens to match, when another slot spoils less. (No RAM
    cache here: it would keep a copy of the wiped conversation, at a cost.)"""
    server = start_server(gemma_gguf, tmp_path / "server.log", "--n-parallel", "2",
                         family="gemma", config=ROOT / "configs" / "gemma3-270m.yaml",
                         env={"VLSERVE_PROMPT_CACHE_RAM_MB": "0"})
    try:
        _scored_beside_a_conversation(server)
    finally:
        stop_server(server)


def _scored_beside_a_conversation(gemma: RunningServer) -> None:  # noqa: F811
    client = openai.OpenAI(base_url=gemma.api, api_key="unused", max_retries=0)  # noqa: F811
    # Both fit the tests' 1024-token context together (else the cache must go for room).
    story = [{"role": "user", "content": "Once upon a time, " * 55 + "what happened?"}]
    first = client.chat.completions.create(model="gemma-3-270m", messages=story,  # type: ignore[arg-type]
                                           max_tokens=1)
    assert first.usage is not None and 250 < first.usage.prompt_tokens < 400
    ids = httpx.post(f"{gemma.api}/tokenize", json={"messages": story}, timeout=30
                     ).json()["tokens"]
    # The same long start (a few-shot prefix, say), then something else.
    scored = httpx.post(f"{gemma.api}/completions", timeout=60, json={
        "prompt": ids[:240] + ids[1:40], "echo": True, "logprobs": 0, "max_tokens": 1})
    assert scored.status_code == 200, scored.text
    again = client.chat.completions.create(model="gemma-3-270m", messages=story,  # type: ignore[arg-type]
                                           max_tokens=1)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= len(ids) - 1


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt.0"),
    ({"prompt": [PROMPT, 7]}, "prompt.1"),
    ({"prompt": [2, 262144]}, "prompt.1"),
    ({"prompt": [[2, 3], [2, -1]]}, "prompt.1.1"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": ["a"] * 64, "n": 2}, "prompt"),  # more than the server queues and runs
    ({"prompt": [PROMPT, "word " * 2000]}, "prompt.1"),  # over the context: which prompt
    ({"prompt": [[2] * 5000]}, "prompt.0"),  # refused by its length, ids unread
    ({"prompt": ""}, "prompt"),
    ({"prompt": PROMPT, "suffix": "end"}, "suffix"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of"),
    ({"prompt": PROMPT, "n": 99}, "n"),
])
def test_what_is_not_served_is_a_400(gemma: RunningServer, body: dict, param: str  # noqa: F811
                                     ) -> None:
    response = httpx.post(f"{gemma.api}/completions", json={"max_tokens": 2, **body},
                          timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_lone_surrogate_in_a_prompt_is_a_400(gemma: RunningServer) -> None:  # noqa: F811
    """JSON can carry "\ud800", which is not Unicode text: named, not a 500."""
    for path in ("completions", "tokenize"):
        response = httpx.post(f"{gemma.api}/{path}", timeout=30,
                              headers={"Content-Type": "application/json"},
                              content=b'{"prompt": "caf\\ud800", "max_tokens": 2}')
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "prompt"
        assert response.json()["error"]["code"] == "invalid_text"


def test_a_batch_of_text_completions(client: openai.OpenAI, gemma: RunningServer  # noqa: F811
                                     ) -> None:
    """OpenAI's Batch API on /v1/completions: each line a text completion."""
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"{i} + {i} =", "max_tokens": 4, "temperature": 0}}
             for i in range(3)]
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                  completion_window="24h")
    done = wait_batch(gemma, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    outputs = read_lines(client, done.output_file_id)
    assert set(outputs) == {"c0", "c1", "c2"}
    for output in outputs.values():
        body = Completion.model_validate(output["response"]["body"])
        assert body.object == "text_completion" and body.choices[0].text
    chat_line = {**lines[0], "url": "/v1/chat/completions"}  # not this batch's endpoint
    mixed = client.files.create(file=("in.jsonl", jsonl([chat_line])), purpose="batch")
    wrong = client.batches.create(input_file_id=mixed.id, endpoint="/v1/completions",
                                  completion_window="24h")
    ended = wait_batch(gemma, wrong.id, {"completed", "failed"})
    assert ended.request_counts is not None and ended.request_counts.failed == 1
