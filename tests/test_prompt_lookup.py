"""Prompt lookup (`prompt_lookup`): without a client's prediction, drafts come from the
request's own text, where the answer's last tokens occurred before (server/engine/lookup.py).

The lookup and its pace are pure logic (unit tests first). The server test runs the real
Gemma 3 270M, whose greedy answer to a story prompt loops (a base model): the loop is
drafted, and the answer is the one a server without lookup writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import ROOT, RunningServer, start_server, stop_server
from helpers import metric_value

# Gemma's verified GGUF (session), a server on it for this module (lookup off: the default).
from test_real_model import client, gemma, gemma_gguf  # noqa: F401

from server.engine import lookup
from server.engine.lookup import ContextLookup, prompt_index
from server.engine.mtmd import PromptChunk
from server.engine.prediction import DraftPace
from server.engine.step_costs import StepCosts

# Step costs as measured on 2 CPU cores with Gemma 3 270M: a second position costs a step.
CPU = StepCosts((1, 2, 3, 4, 8, 16), (1.0, 2.0, 3.0, 3.4, 4.5, 7.0))


def _lookup(*chunks: tuple[int, ...] | None) -> ContextLookup:
    """A lookup over a prompt of text chunks (None: an image)."""
    parts = [PromptChunk(tokens=(), image=object(), n_tokens=1, handle=0) if c is None  # type: ignore[arg-type]
             else PromptChunk(tokens=c, image=None, n_tokens=len(c), handle=0)
             for c in chunks]
    return ContextLookup(prompt_index(parts))


# --- the lookup ------------------------------------------------------------------------
def test_a_loop_in_the_answer_drafts_its_continuation_in_full() -> None:
    lookup = _lookup((90, 91))
    answer = [1, 2, 3, 4, 5, 1, 2]
    at, draft = lookup.draft(answer, 0, 8)
    # After "1 2" came "3 4 5 1 2 ..."; the copy runs on into what it drafts itself.
    assert draft == (3, 4, 5, 1, 2, 3, 4, 5)
    assert at == 2 + 2  # the prompt's 2 tokens, then the answer's index of the 3


def test_the_latest_occurrence_in_the_answer_wins() -> None:
    lookup = _lookup(())
    assert lookup.draft([7, 8, 1, 7, 8, 2, 7, 8], 0, 1)[1] == (2,)


def test_text_the_answer_quotes_from_the_prompt_is_drafted() -> None:
    lookup = _lookup((50, 10, 11, 12, 13, 14, 51))
    assert lookup.draft([10, 11], 0, 4)[1] == (12, 13, 14, 51)


def test_no_draft_runs_across_an_image() -> None:
    lookup = _lookup((10, 11, 12), None, (13, 14))
    assert lookup.draft([10, 11], 0, 4)[1] == (12,)
    assert lookup.draft([10, 11, 12], 0, 4) == (-1, ())


def test_only_the_prompts_last_window_is_indexed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lookup, "PROMPT_WINDOW", 4)
    assert _lookup((10, 11, 12, 1, 2, 3, 4)).draft([10, 11], 0, 4) == (-1, ())
    assert _lookup((10, 11, 12, 1, 2, 3, 4)).draft([2, 3], 0, 4)[1] == (4,)


def test_one_matching_token_is_no_match() -> None:
    lookup = _lookup((5, 6, 7))
    assert lookup.draft([5], 0, 4) == (-1, ())
    assert lookup.draft([9, 5], 0, 4) == (-1, ())


# --- its pace --------------------------------------------------------------------------
def test_on_a_cpu_a_watched_pace_drafts_only_after_its_guesses_were_right() -> None:
    pace = DraftPace.watched(16, CPU, 0.3, 1.1)
    assert pace.allowed(1, 16) == 0
    assert pace.rest == 0 and pace.least_match == 1  # no rest: the next guess is checked
    for _ in range(12):  # a loop: each undrafted guess was the token written
        pace.observed(True)
    assert pace.allowed(1, 16) >= 8
    pace.checked(16, 16)
    for _ in range(4):  # the loop ends: guesses miss
        pace.observed(False)
    assert pace.allowed(1, 16) == 0 and pace.rest == 0


def test_a_refused_draft_lowers_the_trust_without_resting() -> None:
    pace = DraftPace.watched(16, CPU, 0.95, 1.1)
    assert pace.allowed(1, 16) > 0
    pace.checked(16, 0)
    assert pace.kept_share < 0.95 and pace.rest == 0


# --- the server on Gemma 3 270M -------------------------------------------------------------
# Greedy answers with and without drafts agree only where no two tokens nearly tie: a drafted
# step rounds logits otherwise (up to 0.07 apart, measured). This answer's closest pair is
# 0.15 apart; "..., number l0." had pairs 0.001 apart and came back as "l1" once drafted.
STORY = [{"role": "user", "content": "Tell a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def looking_up(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
               ) -> Iterator[RunningServer]:
    server = start_server(gemma_gguf, tmp_path_factory.mktemp("lookup") / "server.log",
                          family="gemma", config=ROOT / "configs" / "gemma3-270m.yaml",
                          env={"VLSERVE_PROMPT_LOOKUP": "true"})
    yield server
    stop_server(server)


def _story(client: openai.OpenAI) -> openai.types.chat.ChatCompletion:  # noqa: F811
    return client.chat.completions.create(model="gemma-3-270m", messages=STORY,  # type: ignore
                                          max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})


@pytest.mark.slow
def test_a_looping_answer_is_drafted_and_unchanged(looking_up: RunningServer,
                                                   client: openai.OpenAI) -> None:  # noqa: F811
    plain = _story(client)
    assert plain.model_extra is not None
    assert plain.model_extra["timings"]["accepted_lookup_tokens"] == 0  # off by default
    accepted_before = metric_value(looking_up.url, "vlserve_lookup_tokens_total",
                                   'result="accepted"')
    fast = _story(openai.OpenAI(base_url=looking_up.api, api_key="unused", max_retries=0,
                                timeout=120))
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert fast.model_extra is not None
    timings = fast.model_extra["timings"]
    # The base model repeats one line over and over: once its guesses proved right (about
    # ten tokens: drafts cost a whole step each on a CPU), the rest came drafted; how many
    # depends on the step costs measured at start (19 of 40 here, 13 on a loaded CI box).
    assert timings["accepted_lookup_tokens"] >= 8, str(timings)
    assert fast.usage is not None and fast.usage.completion_tokens == 40
    # Not the client's prediction: usage reports none.
    details = fast.usage.completion_tokens_details
    assert details is not None and details.accepted_prediction_tokens == 0
    assert metric_value(looking_up.url, "vlserve_lookup_tokens_total",
                        'result="accepted"') == accepted_before + timings["accepted_lookup_tokens"]
