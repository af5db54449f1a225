"""What an idle engine evaluates ahead of a conversation's next turn (server/engine/next_turn.py):
the template's markup after an answer, checked against each family's real tokenization
path (mtmd for the vision models), so a guess is a prefix of every next turn's prompt."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import FAMILIES, MODEL_FIXTURES, RunningServer
from helpers import metric_value, photo_bytes

from server.config import load_settings
from server.demo_model import DemoModelPaths
from server.engine.model import LoadedModel, load_model
from server.engine.prepare import Preparer
from server.engine.scheduler import NEXT_TURN_HOLD_S, Scheduler
from server.engine.tokens import token_piece
from server.engine.types import (
    ChatMessage,
    DoneEvent,
    EngineEvent,
    GenerationRequest,
    ImageInput,
    SamplingParams,
)
from server.engine.watchdog import Watchdog
from server.images.decode import decode_image

# What follows an answer in each demo family's template, up to the next user's text.
EXPECTED = {
    "llava": ("</s>", "USER:"),
    "youtu-vl": ("<|end_of_text|>", "<|begin_of_text|>user"),
    "glm4v": ("<|user|>", "<|user|>"),
}
ANSWER = "The sky is blue today."
NEXT = ["What about tomorrow?", "1, 2, 3", "\nnew line first", "?", "éclair", " spaced"]


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request: pytest.FixtureRequest) -> Iterator[tuple[str, LoadedModel]]:
    paths = request.getfixturevalue(MODEL_FIXTURES[request.param])
    model = load_model(load_settings(None, model=paths.text, mmproj=paths.mmproj,
                                     n_ctx=1024, n_parallel=1))
    try:
        yield request.param, model
    finally:
        model.close()


def _keys(model: LoadedModel, messages: list[ChatMessage]) -> list[object]:
    prompt = Preparer(model, None).prepare(GenerationRequest(messages, max_tokens=1))
    try:
        return list(prompt.keys())
    finally:
        prompt.close()


def _contains(keys: list[object], run: tuple[int, ...]) -> bool:
    return any(tuple(keys[i:i + len(run)]) == run for i in range(len(keys) - len(run) + 1))


def test_markup_is_the_templates_end_of_turn(loaded: tuple[str, LoadedModel]) -> None:
    family, model = loaded
    markup = model.next_turn_markup
    assert markup, f"{family}: no next-turn markup found"
    text = b"".join(token_piece(model.vocab, t, special=True) for t in markup).decode()
    first, last = EXPECTED[family]
    assert text.startswith(first) and text.rstrip(" ").endswith(last), text


def test_every_next_turn_starts_with_the_markup(loaded: tuple[str, LoadedModel]) -> None:
    """Whatever the next user sends (text of any first character, or an image first), the
    prompt has the markup right after the answer: the guess is never wrong for a client
    that sends the answer back as it got it."""
    family, model = loaded
    markup = model.next_turn_markup
    history = [ChatMessage("user", ("Describe the sky.",)), ChatMessage("assistant", (ANSWER,))]
    nexts: list[tuple[str | ImageInput, ...]] = [(text,) for text in NEXT]
    if model.vision:
        decoded = decode_image(photo_bytes(64, 48), 64)
        image = ImageInput(rgb=decoded.rgb, width=decoded.width, height=decoded.height,
                           content_hash="next-turn-test")
        nexts.append((image, "What is this?"))
    for parts in nexts:
        keys = _keys(model, [*history, ChatMessage("user", parts)])
        assert _contains(keys, markup), f"{family}: markup missing before {parts[0]!r}"


def test_no_guess_without_markup() -> None:
    from server.engine.next_turn import guess

    assert guess((), 7) == []  # off (or unknown): not even the answer's last token
    assert guess((2, 3), 7) == [7, 2, 3]
    assert guess((2, 3), None) == [2, 3]


def next_turn_tokens(url: str) -> float:
    return metric_value(url, "vlserve_next_turn_tokens_total")


def wait_next_turn(url: str, before: float, at_least: int = 1) -> None:
    """Until the idle engine has evaluated `at_least` tokens ahead since `before`."""
    deadline = time.monotonic() + 30
    while next_turn_tokens(url) < before + at_least:
        assert time.monotonic() < deadline, "the next turn's start was never evaluated"
        time.sleep(0.05)


def test_turn_two_evaluates_only_its_new_text(server: RunningServer) -> None:
    """Random weights write splits the tokenizer would not (and stray bytes that come back
    as U+FFFD): while the engine idles, the slot's answer is re-tokenized as the next prompt
    will have it, and the markup follows. Turn 2 then evaluates only its own new text, the
    same number of tokens in every conversation, and answers as a cold server would
    (tests/test_scheduling.py checks that)."""
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)
    uncached: dict[str, int] = {}
    for n, topic in enumerate(["a lighthouse", "the sea", "a red kite", "bread", "snow",
                               "a violin", "maps", "tea"]):
        question = [{"role": "user", "content": f"Tell me about {topic}."}]
        before = next_turn_tokens(server.url)
        first = client.chat.completions.create(
            model=server.model_name, messages=question, max_tokens=12 + n, temperature=0,
            extra_body={"ignore_eos": True})
        assert first.choices[0].finish_reason == "length"
        wait_next_turn(server.url, before)
        second = client.chat.completions.create(
            model=server.model_name, max_tokens=1, temperature=0, messages=[
                *question, {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "Go on."}])
        assert second.usage is not None and second.usage.prompt_tokens_details is not None
        cached = second.usage.prompt_tokens_details.cached_tokens or 0
        uncached[topic] = second.usage.prompt_tokens - cached
    # "Go on." and the generation prompt: the same few tokens after every answer.
    assert len(set(uncached.values())) == 1 and next(iter(uncached.values())) < 16, uncached


def test_a_guess_waits_until_its_answer_is_on_its_way(demo_model: DemoModelPaths,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's response is built and written by the event loop after the engine hands
    it over; a guess decoding meanwhile would take the cores from it (on 2 cores each
    response left ~3 ms later). So the engine holds the guess NEXT_TURN_HOLD_S."""
    settings = load_settings(None, model=demo_model.text, mmproj=demo_model.mmproj,
                             n_ctx=1024, n_parallel=1)
    model = load_model(settings)
    scheduler = Scheduler(model, settings, Watchdog(0, lambda what, s: None))
    answered: list[float] = []
    guessed: list[float] = []
    prefill = scheduler._prefill_next_turns

    def timed_prefill() -> None:
        guessed.append(time.monotonic())
        prefill()

    class Sink:
        def put(self, event: EngineEvent) -> None:
            if isinstance(event, DoneEvent):
                answered.append(time.monotonic())

    monkeypatch.setattr(scheduler, "_prefill_next_turns", timed_prefill)
    stop = threading.Event()
    engine = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    engine.start()
    try:
        request = GenerationRequest([ChatMessage("user", ("Tell me about the sea.",))],
                                    max_tokens=4, sampling=SamplingParams(temperature=0.0,
                                                                          ignore_eos=True))
        scheduler.submit(request, Preparer(model, None).prepare(request), Sink())
        deadline = time.monotonic() + 30
        while not guessed:
            assert time.monotonic() < deadline, "no next turn was guessed"
            time.sleep(0.005)
    finally:
        stop.set()
        engine.join(10)
        scheduler.close()
        model.close()
    assert len(answered) == 1
    # The hold runs from the slot's end, a moment before the answer is handed over.
    assert guessed[0] - answered[0] >= NEXT_TURN_HOLD_S - 0.002, (guessed[0] - answered[0])
