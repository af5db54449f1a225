"""Predicted Outputs (`prediction` on chat completions): the client's guess of the answer is
checked as draft tokens, so a good guess costs fewer decode steps, and the answer stays
exactly the one the model writes without it.

The lookup is pure logic (unit tests below). The answers are checked on the real Gemma 3
270M (a real vocabulary, so its own answer tokenizes back to the tokens it wrote) and on the
random-weight demo model with an image, through the real server and the `openai` SDK.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

import httpx
import openai
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server
from helpers import data_url, image_message, metric_value, photo_bytes

# Gemma's verified GGUF (session), a server on it for this module, its openai client.
from test_real_model import client, gemma, gemma_gguf  # noqa: F401

from server.engine.batch import TokenBatch
from server.engine.drafts import add_drafts, room_beside_others
from server.engine.jobs import Job, Slot
from server.engine.prediction import (
    MAX_REST,
    NEAR,
    NGRAM,
    PRIOR_KEPT,
    DraftPace,
    Prediction,
    best_length,
)
from server.engine.step_costs import StepCosts, linear, steady
from server.engine.types import GenerationRequest

pytestmark = pytest.mark.slow

STORY = [{"role": "user", "content": "Write a long story about a fox and a crow."}]
LONG = {"ignore_eos": True}  # the base model's answer runs to max_tokens, 40 here
SAMPLED_OPENING = 40  # characters of a sampled answer that drafts must leave as they were


# --- the lookup ------------------------------------------------------------------------
def test_an_answer_that_follows_the_prediction_gets_what_comes_next() -> None:
    prediction = Prediction.of([10, 11, 12, 13, 14, 15])
    assert prediction.draft([10], 0, 3) == (1, (11, 12, 13))
    assert prediction.draft([10, 11, 12], 1, 8) == (3, (13, 14, 15))
    assert prediction.draft([10, 11, 12, 13, 14, 15], 6, 8) == (-1, ())  # nothing follows
    assert prediction.draft([10], 0, 0) == (-1, ())


def test_after_an_edit_the_answer_finds_its_place_again() -> None:
    prediction = Prediction.of([1, 2, 3, 4, 5, 6, 7, 8])
    # The model wrote 99 where the prediction says 4: nothing follows 3, 99 anywhere.
    assert prediction.draft([1, 2, 3, 99], 3, 4) == (-1, ())
    # One token later it is back on the prediction's text: a lone match just ahead counts.
    assert prediction.draft([1, 2, 3, 99, 5], 3, 4) == (5, (6, 7, 8))


def test_repeated_text_continues_where_the_answer_was() -> None:
    prediction = Prediction.of([7, 8, 9, 1, 7, 8, 9, 2])
    assert prediction.draft([7, 8, 9], 0, 1) == (3, (1,))
    assert prediction.draft([7, 8, 9], 4, 1) == (7, (2,))
    # A probe after a rest wants the last NGRAM tokens found, not a stray common one.
    assert prediction.draft([5, 9], 0, 1, least=NGRAM) == (-1, ())
    assert prediction.draft([5, 9], 0, 1) == (3, (1,))


def test_a_lone_common_token_far_away_is_no_place() -> None:
    tokens = [5, *range(100, 100 + 2 * NEAR), 5, 6]
    prediction = Prediction.of(tokens)
    assert prediction.draft([42, 5], 0, 2) == (1, (100, 101))  # just ahead of the cursor
    after = len(tokens) - 1  # what follows the second 5, far past NEAR from 0
    assert prediction.draft([42, 5], after - NEAR - 1, 2) == (-1, ())
    assert prediction.draft([42, 5], after - NEAR, 2) == (after, (6,))


# Gemma 3 270M on 2 CPU cores (relative to one position): rows are matrix-vector products
# up to 3, batched kernels from 4.
CPU = StepCosts((1, 2, 3, 5, 9, 17), (1.0, 2.0, 3.06, 3.7, 4.82, 7.08))
GPU = linear(0.02, 64)  # a few more rows cost almost nothing


def test_step_costs_between_and_beyond_what_was_measured() -> None:
    assert CPU.of(9) == 4.82 and CPU.of(1) == 1.0
    assert CPU.of(4) == pytest.approx((3.06 + 3.7) / 2)
    assert CPU.of(25) == pytest.approx(7.08 + (7.08 - 4.82) / 8 * 8)
    assert CPU.extra(2, 7) == pytest.approx(4.82 / 2.0)
    # A busy core made 4 positions look slower than 8: the 4 is the inflated one.
    measured = steady([1, 2, 4, 8], [1.0, 4.5, 9.0, 5.0])
    assert measured.seconds == (1.0, 4.5, 5.0, 5.0) and measured.of(12) == 5.0
    # One position is all a batch may hold (n_batch 1): still a price for more.
    assert linear(0.5, 1).of(3) == 2.0


def test_drafts_are_as_long_as_they_pay() -> None:
    # On that CPU a draft pays only when long and mostly kept.
    assert best_length(0.5, CPU, 1, 16) == 0
    assert best_length(0.9, CPU, 1, 16) == 9
    assert best_length(0.99, CPU, 1, 16) == 16
    # On a GPU even a coin flip's draft pays, shorter.
    assert 0 < best_length(0.5, GPU, 1, 16) < 8
    assert best_length(1.0, GPU, 1, 8) == 8
    # Beside other streams a draft must also pay for the time it adds to their step: the
    # more share the step, the shorter.
    assert [best_length(0.9, CPU, base, 16) for base in (1, 2, 4, 8)] == [9, 8, 7, 5]


def test_beside_other_streams_drafts_slow_the_step_a_bounded_share() -> None:
    # On that CPU a third position costs a whole step: beside one other stream, 1.5× allows
    # none; beside more, the batched kernels leave room for a few.
    assert [room_beside_others(CPU, plain, 0, 1.5, 64) for plain in (2, 3, 5, 9)] == [0, 5, 6, 8]
    assert room_beside_others(CPU, 2, 0, 2.0, 64) == 4
    # Drafts already in the step (another request's) count against the same bound.
    assert room_beside_others(linear(0.1, 64), 2, 0, 1.5, 64) == 5
    assert room_beside_others(linear(0.1, 64), 2, 3, 1.5, 64) == 2
    # On a GPU the bound rarely bites; 1.0 allows nothing that costs anything.
    assert room_beside_others(GPU, 2, 0, 1.5, 64) == 25
    assert room_beside_others(GPU, 2, 0, 1.0, 64) == 0
    assert room_beside_others(GPU, 2, 0, 1.5, 16) == 16  # counted no further than needed


def _stream(seq_id: int, drafts: bool) -> Slot:
    """A generating slot whose answer so far follows a prediction it trusts (`drafts`), or
    a plain one."""
    predicted = tuple(range(100, 140))
    job = Job(request=GenerationRequest(messages=[], max_tokens=200), sink=None,  # type: ignore[arg-type]
              sampler=None, text=None, max_new=200, prompt=None, work=deque(),  # type: ignore[arg-type]
              deadline=0.0, order=seq_id, tokens=list(predicted[:3]),
              next_token=predicted[2])
    if drafts:
        job.drafts_from = Prediction.of(predicted)
        job.pace = DraftPace(16, CPU, kept_weight=4.9, seen_weight=5.0)
    return Slot(seq_id=seq_id, n_past=10, job=job)


def _drafted(slots: list[Slot]) -> list[int]:
    batch = TokenBatch(64)
    try:
        for slot in slots:
            assert slot.job is not None
            batch.add(slot.job.next_token, slot.n_past, slot.seq_id, True)
        add_drafts(batch, slots, 60, 1.5)
        return [len(slot.job.draft) for slot in slots]  # type: ignore[union-attr]
    finally:
        batch.close()


def test_beside_a_stream_that_drafts_too_the_bound_gives_more_room() -> None:
    """The bound is on another stream's time per token: a plain one gets one token a step
    (on that CPU, beside it no draft fits at 1.5), one that drafts itself expects several,
    so both draft; they share the most drafts a step takes (16) evenly."""
    assert _drafted([_stream(0, True)]) == [16]
    assert _drafted([_stream(0, True), _stream(1, False)]) == [0, 0]
    assert _drafted([_stream(0, True), _stream(1, True)]) == [8, 8]


def test_a_draft_the_bound_holds_back_is_no_miss() -> None:
    """Beside another stream the bound may leave room for a draft too short to pay (on
    that CPU one more position costs a whole step). That is no miss: the pace must not
    rest, or the request would draft nothing for up to 64 steps once the other ends."""
    pace = DraftPace(16, CPU)
    assert pace.allowed(2, 16, cap=1) == 0
    assert (pace.rest, pace.misses) == (0, 0)
    pace.step()
    assert pace.allowed(1, 16) == 9  # alone again: drafts at once
    # Where no length would pay even unbounded, it still rests.
    doubtful = DraftPace(16, CPU, kept_weight=0.5, seen_weight=1.0)
    assert doubtful.allowed(2, 16, cap=1) == 0 and doubtful.rest == 2


def test_the_pace_follows_what_was_kept_and_rests_after_misses() -> None:
    pace = DraftPace(16, GPU)
    first = pace.allowed(1, 16)
    assert first == best_length(PRIOR_KEPT, GPU, 1, 16) > 0  # the client expects it kept
    assert pace.allowed(1, 3) == 3  # no more than is on offer
    pace.checked(first, 1)
    assert 0 < pace.allowed(1, 16) < first  # kept in part: less sure
    for _ in range(6):
        pace.checked(4, 4)
    assert pace.allowed(1, 16) == 16  # kept whole, again and again
    rests = []
    for _ in range(8):  # nothing kept, again and again: rests of 1, 2, 4, ... steps
        pace.checked(pace.allowed(1, 16), 0)
        steps = 0
        while pace.allowed(1, 16) == 0:
            pace.step()
            steps += 1
        rests.append(steps)
    assert rests == [1, 2, 4, 8, 16, 32, MAX_REST, MAX_REST]
    for _ in range(6):
        pace.checked(4, 4)
    assert pace.misses == 0 and pace.rest == 0


def test_where_no_draft_pays_the_pace_rests_then_probes_as_at_the_start() -> None:
    pace = DraftPace(16, CPU)
    assert pace.allowed(1, 16) == 9
    pace.checked(9, 1)  # mostly refused (dense edits): on that CPU no draft pays now
    rests = []
    for _ in range(5):
        steps = 0
        while pace.rest:
            assert pace.allowed(1, 16) == 0
            pace.step()
            steps += 1
        rests.append(steps)
        assert pace.least_match == NGRAM  # the probe waits for a strong match...
        assert pace.allowed(1, 16) == 9  # ...and is as trusting as the first draft,
        pace.checked(9, 2)  # which keeps a little again: the rests still grow
    assert rests == [1, 2, 4, 8, 16]


def test_a_one_token_batch_serves_a_prediction(demo_model, tmp_path: Path) -> None:  # type: ignore
    """n_batch 1 leaves no room for drafts (nor for measuring longer steps): the request is
    answered as without a prediction."""
    server = start_server(demo_model, tmp_path / "server.log", "--n-parallel", "1",
                          env={"VLSERVE_N_BATCH": "1", "VLSERVE_N_UBATCH": "1"})
    try:
        client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0,
                               timeout=120)
        ask = {"model": server.model_name, "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "user", "content": "Hello there"}]}
        text = client.chat.completions.create(**ask).choices[0].message.content  # type: ignore
        again = client.chat.completions.create(**ask, extra_body={  # type: ignore
            "prediction": {"type": "content", "content": text}})
        assert again.choices[0].message.content == text
        assert "decode step time by positions" not in server.log()
    finally:
        stop_server(server)


# --- a real model (the server and client fixtures of tests/test_real_model.py) ---------
def _ask(client: openai.OpenAI, prediction: str | None = None, **kwargs: object  # noqa: F811
         ) -> openai.types.chat.ChatCompletion:
    extra = {} if prediction is None else {"prediction": {"type": "content",
                                                          "content": prediction}}
    return client.chat.completions.create(model="gemma-3-270m", messages=STORY,  # type: ignore
                                          max_tokens=40, extra_body=LONG, **extra,
                                          **{"temperature": 0, **kwargs})


def _details(answer: openai.types.chat.ChatCompletion) -> tuple[int, int]:
    usage = answer.usage
    assert usage is not None and usage.completion_tokens_details is not None
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens is not None
    assert details.rejected_prediction_tokens is not None
    return details.accepted_prediction_tokens, details.rejected_prediction_tokens


def test_the_answer_is_the_same_and_the_prediction_is_taken(client: openai.OpenAI,  # noqa: F811
                                                            gemma: RunningServer) -> None:  # noqa: F811
    plain = _ask(client)
    text = plain.choices[0].message.content
    assert text and _details(plain) == (0, 0)
    accepted_before = metric_value(gemma.url, "vlserve_prediction_tokens_total",
                                   'result="accepted"')
    guessed = _ask(client, text)
    assert guessed.choices[0].message.content == text
    accepted, rejected = _details(guessed)
    # The answer is its own prediction: after its first token (from the prompt's step) the
    # rest comes drafted, a few tokens sampled between drafts.
    assert accepted >= 30 and rejected == 0, (accepted, rejected)
    # /metrics counts them too.
    assert metric_value(gemma.url, "vlserve_prediction_tokens_total",
                        'result="accepted"') == accepted_before + accepted


def test_an_edited_prediction_still_gives_the_models_answer(client: openai.OpenAI) -> None:  # noqa: F811
    text = _ask(client).choices[0].message.content
    assert text
    words = text.split(" ")
    edited = " ".join(w.upper() if i % 4 == 2 else w for i, w in enumerate(words))
    guessed = _ask(client, edited)
    assert guessed.choices[0].message.content == text
    accepted, rejected = _details(guessed)
    assert accepted > 0 and rejected > 0, (accepted, rejected)
    unrelated = _ask(client, "Completely unrelated words: tax forms, invoices, ledgers.")
    assert unrelated.choices[0].message.content == text


def test_streamed_with_usage_and_as_content_parts(client: openai.OpenAI) -> None:  # noqa: F811
    text = _ask(client).choices[0].message.content
    assert text
    half = len(text) // 2
    stream = client.chat.completions.create(
        model="gemma-3-270m", messages=STORY, max_tokens=40, temperature=0,  # type: ignore
        stream=True, stream_options={"include_usage": True},
        extra_body={**LONG, "prediction": {"type": "content", "content": [
            {"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]}})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens_details is not None
    assert (usage.completion_tokens_details.accepted_prediction_tokens or 0) >= 30


def test_sampled_answers_are_drawn_the_same_way(client: openai.OpenAI) -> None:  # noqa: F811
    """With temperature, each kept draft token is the one the sampler drew at its place:
    the same seed opens the answer the same way with or without a prediction. Only its
    opening: drafts are checked in one batch of several tokens, and on some CPUs llama.cpp
    rounds such a batch's logits otherwise than a one-token step's (on a 2-core AMD EPYC
    greedy logprobs differed by up to 0.07 between the two), so a later draw near a
    boundary may fall the other way; a draw taken out of turn would part them early."""
    sampled = {"temperature": 0.9, "seed": 7}
    plain = _ask(client, **sampled)
    text = plain.choices[0].message.content
    assert text and len(text) > SAMPLED_OPENING
    greedy = _ask(client).choices[0].message.content
    assert greedy and greedy[:SAMPLED_OPENING] != text[:SAMPLED_OPENING]  # it was sampled
    guessed = _ask(client, text, **sampled)
    answer = guessed.choices[0].message.content
    assert answer and answer[:SAMPLED_OPENING] == text[:SAMPLED_OPENING]
    assert _details(guessed)[0] > 0


def test_with_a_json_schema_and_logprobs(client: openai.OpenAI) -> None:  # noqa: F811
    """A constrained answer's grammar takes each kept draft token in turn, and each token's
    logprob is read at its own position of the step."""
    schema = {"type": "object", "properties": {"story": {"type": "string"}},
              "required": ["story"], "additionalProperties": False}
    constrained = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "schema": schema}}, "logprobs": True, "top_logprobs": 2}
    plain = client.chat.completions.create(model="gemma-3-270m", messages=STORY,  # type: ignore
                                           max_tokens=40, temperature=0, **constrained)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].logprobs and plain.choices[0].logprobs.content
    guessed = client.chat.completions.create(
        model="gemma-3-270m", messages=STORY, max_tokens=40, temperature=0,  # type: ignore
        extra_body={"prediction": {"type": "content", "content": text}}, **constrained)
    assert guessed.choices[0].message.content == text
    assert _details(guessed)[0] > 0
    got = guessed.choices[0].logprobs
    assert got and got.content
    assert [e.token for e in got.content] == [e.token for e in plain.choices[0].logprobs.content]
    # Near, not equal: the cached prompt's rows drift between runs (-15.2 vs -15.1 was seen
    # on the first token), and a step of several rows runs other matrix kernels than a
    # step of one (llamafile's sgemm). A row read at the wrong index would be far off.
    drift = [abs(ours.logprob - theirs.logprob)
             for ours, theirs in zip(got.content, plain.choices[0].logprobs.content, strict=True)]
    assert sum(drift) / len(drift) < 0.05 and max(drift) < 0.3, drift


def test_every_choice_counts_in_usage(client: openai.OpenAI) -> None:  # noqa: F811
    text = _ask(client).choices[0].message.content
    assert text
    one = _details(_ask(client, text))[0]
    both = _ask(client, text, n=2)
    assert [c.message.content for c in both.choices] == [text, text]
    # Both choices draft in the same steps, which hold at most one request's most drafts in
    # all: each keeps a few fewer than alone.
    assert 1.5 * one <= _details(both)[0] <= 2 * one


def test_a_malformed_prediction_is_a_400_naming_it(gemma: RunningServer) -> None:  # noqa: F811
    for prediction in ({"type": "text", "content": "x"}, {"type": "content"},
                       {"type": "content", "content": [{"type": "image_url", "text": "x"}]},
                       "just a string"):
        reply = httpx.post(f"{gemma.api}/chat/completions", timeout=30, json={
            "model": "gemma-3-270m", "messages": STORY, "prediction": prediction})
        assert reply.status_code == 400, (prediction, reply.text)
        assert "prediction" in reply.json()["error"]["message"]


# --- the engine's KV after drafts it took back -------------------------------------------
def test_taken_back_drafts_leave_the_cache_as_without_them(demo_model,  # type: ignore
                                                           tmp_path: Path) -> None:
    """On the demo model (random weights, an image): a prediction made of the answer's own
    text with its second half changed gets some drafts taken back. Afterwards the slot's
    cache must hold exactly what the answer wrote: the next turn, which reuses it, answers
    as a server that never saw a prediction does."""
    image = image_message("What is in this picture?", data_url(photo_bytes()))
    answers: dict[str, list[str]] = {}
    for run, use_prediction in (("plain", False), ("predicted", True)):
        # Drafts paced by a set cost where they are counted (see test_real_model's gemma).
        env = {"VLSERVE_PREDICTION_POSITION_COST": "0.1"} if use_prediction else {}
        server = start_server(demo_model, tmp_path / f"{run}.log", "--n-parallel", "1",
                              env=env)
        try:
            # Measured at warm-up unless set (by the projector's model too).
            assert ("decode step time by positions" in server.log()) is not use_prediction
            client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0,
                                   timeout=120)
            first = client.chat.completions.create(model=server.model_name, messages=[image],
                                                   max_tokens=30, temperature=0)
            text = first.choices[0].message.content or ""
            extra = {}
            if use_prediction:
                guess = text[:len(text) // 2] + "zzzz qqqq " * 8
                extra = {"prediction": {"type": "content", "content": guess}}
                again = client.chat.completions.create(
                    model=server.model_name, messages=[image], max_tokens=30, temperature=0,
                    extra_body=extra)
                assert again.choices[0].message.content == text
                assert again.usage is not None and again.usage.completion_tokens_details
                assert again.usage.completion_tokens_details.rejected_prediction_tokens
            follow = [image, {"role": "assistant", "content": text},
                      {"role": "user", "content": "Say more."}]
            second = client.chat.completions.create(model=server.model_name, messages=follow,
                                                    max_tokens=30, temperature=0)
            answers[run] = [text, second.choices[0].message.content or ""]
        finally:
            stop_server(server)
    assert answers["predicted"] == answers["plain"]


def test_off_when_max_draft_is_zero(gemma_gguf: Path, tmp_path: Path) -> None:  # noqa: F811
    server = start_server(gemma_gguf, tmp_path / "server.log", family="gemma",
                          config=ROOT / "configs" / "gemma3-270m.yaml",
                          env={"VLSERVE_PREDICTION_MAX_DRAFT": "0",
                               "VLSERVE_PREDICTION_POSITION_COST": "0.1"})
    try:
        client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0,
                               timeout=120)
        text = _ask(client).choices[0].message.content
        assert _details(_ask(client, text)) == (0, 0)
    finally:
        stop_server(server)


def test_no_drafts_slow_another_clients_stream_beyond_the_bound(gemma_gguf: Path,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """With prediction_max_slowdown 1.0 nothing may slow another request's step: a
    prediction drafts alone, not beside a plain stream (which it would otherwise, at the
    set cost of 0.1 a position: see the bound's unit test)."""
    server = start_server(gemma_gguf, tmp_path / "server.log", family="gemma",
                          config=ROOT / "configs" / "gemma3-270m.yaml",
                          env={"VLSERVE_PREDICTION_MAX_SLOWDOWN": "1.0",
                               "VLSERVE_PREDICTION_POSITION_COST": "0.1",
                               "VLSERVE_MAX_TOKENS_CAP": "400"})
    try:
        client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0,
                               timeout=120)
        text = _ask(client).choices[0].message.content
        assert text
        assert _details(_ask(client, text))[0] >= 30  # alone: drafted

        streaming = threading.Event()
        plain_tokens: list[str] = []

        def plain_stream() -> None:
            for chunk in client.chat.completions.create(
                    model="gemma-3-270m", messages=STORY, max_tokens=400, stream=True,
                    temperature=0, extra_body=LONG):
                if chunk.choices and chunk.choices[0].delta.content:
                    plain_tokens.append(chunk.choices[0].delta.content)
                    streaming.set()

        beside = threading.Thread(target=plain_stream)
        beside.start()
        try:
            assert streaming.wait(60)
            guessed = _ask(client, text)
            still_running = beside.is_alive()
        finally:
            beside.join(120)
        assert still_running, "the plain stream ended before the predicted answer did"
        assert guessed.choices[0].message.content == text
        assert _details(guessed) == (0, 0)
        assert len(plain_tokens) > 100
    finally:
        stop_server(server)
