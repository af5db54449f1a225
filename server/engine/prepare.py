"""Messages → tokenized prompt, on the caller's thread (never the engine's).

Rendering and tokenizing grow with the request, so they run before the request reaches the
engine: one client's huge body then costs a worker thread, not every stream's next token.
A prompt that cannot fit the context is refused from its size alone, before tokenizing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import llama_cpp

from server.engine import mtmd
from server.engine.lookup import prompt_index
from server.engine.model import LoadedModel
from server.engine.mtmd import PromptChunk, TokenizedPrompt
from server.engine.prediction import Prediction
from server.engine.prompt import PromptError, RenderedPrompt, Segment
from server.engine.prompt_text import prompt_texts
from server.engine.tokens import detokenize, text_prompt, token_piece, tokenize_text
from server.engine.types import ErrorEvent, GenerationRequest, PromptTokens


class PromptRefused(Exception):
    """The request cannot be served as sent; `event` is its answer."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.event = event


class ModelGate:
    """Tokenizing threads use the model's vocab and mtmd context: closing waits for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._closed = False

    def __enter__(self) -> None:
        with self._cond:
            if self._closed:
                raise PromptRefused(ErrorEvent(503, "the server is shutting down",
                                               code="server_shutting_down"))
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._users == 0, timeout)


class Preparer:
    def __init__(self, model: LoadedModel, system_prompt: str | None,
                 prompt_lookup: bool = False) -> None:
        self.model = model
        self._system_prompt = system_prompt
        self.gate = ModelGate()
        # Rejected draft tokens are taken back out of the KV cache; a recurrent model's
        # state cannot be rolled back a few tokens, so it gets no drafts.
        self._drafts = not (llama_cpp.llama_model_is_recurrent(model.model)
                            or llama_cpp.llama_model_is_hybrid(model.model))
        self._lookup = prompt_lookup and self._drafts

    def count(self, request: GenerationRequest, *, add_special: bool, pieces: bool
              ) -> PromptTokens:
        """The request's prompt as the model would read it, whether or not it fits the
        context. add_special: with the BOS/EOS the tokenizer adds around it."""
        prompt = self.prepare(request, fit=False)
        try:
            tokens = [t for chunk in prompt.chunks for t in chunk.tokens]
        finally:
            prompt.close()
        vocab = self.model.vocab
        if not add_special:
            if tokens and llama_cpp.llama_vocab_get_add_bos(vocab) \
                    and tokens[0] == llama_cpp.llama_vocab_bos(vocab):
                del tokens[0]
            if tokens and llama_cpp.llama_vocab_get_add_eos(vocab) \
                    and tokens[-1] == llama_cpp.llama_vocab_eos(vocab):
                del tokens[-1]
        texts = None
        if pieces:
            with self.gate:
                texts = tuple(token_piece(vocab, t, special=True).decode("utf-8", "replace")
                              for t in tokens)
        return PromptTokens(tuple(tokens), prompt.image_tokens, texts)

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        with self.gate:
            return detokenize(self.model.vocab, tokens, special=special)

    def echo(self, tokens: Sequence[int]) -> str:
        with self.gate:
            texts = prompt_texts(self.model, tokens, written=False)
        return b"".join(texts).decode("utf-8", errors="replace")

    def prepare(self, request: GenerationRequest, *, fit: bool = True
                ) -> mtmd.TokenizedPrompt:
        """Raises PromptRefused with the answer for what cannot be served. fit=False: only
        a prompt that certainly could not fit (from its size alone) is refused, untokenized;
        any other is tokenized whole, however long."""
        model = self.model
        timer = request.timer
        if request.prompt_tokens is not None:
            prompt = self._checked(request, TokenizedPrompt(None, [PromptChunk(
                tokens=request.prompt_tokens, image=None,
                n_tokens=len(request.prompt_tokens), handle=0)]), fit)
            if fit:
                self._index_for_lookup(request, prompt)
            return prompt
        self._check_client_size(request)
        try:
            rendered = RenderedPrompt((Segment(request.prompt, user=False),), ()) \
                if request.prompt is not None else model.template.render(
                    request.messages, self._system_prompt,
                    template_kwargs=request.template_kwargs)
        except PromptError as exc:
            raise PromptRefused(ErrorEvent(400, str(exc))) from None
        if request.prompt is None:  # a raw prompt is its own text: checked just above
            self._check_size(rendered)
        t0 = time.perf_counter()
        with self.gate:
            try:
                parts = model.splitter.parts(rendered)
                prompt = mtmd.tokenize_parts(model.mtmd, parts) if model.mtmd is not None \
                    else text_prompt(model.vocab, parts)
            except mtmd.MediaError as exc:
                raise PromptRefused(ErrorEvent(400, str(exc))) from None
        # mtmd's preprocessing (resize + normalize for the projector) dominates tokenization
        # when images are present: it is booked as resizing, so `image_encode` is the vision
        # encoder alone and reads 0 when the embedding cache answers.
        timer.add("image_resize" if rendered.images else "prompt_eval", time.perf_counter() - t0)
        prompt = self._checked(request, prompt, fit)
        if request.prediction and self._drafts:
            request.predicted = self._predicted(request.prediction)
        elif fit:
            self._index_for_lookup(request, prompt)
        return prompt

    def _index_for_lookup(self, request: GenerationRequest, prompt: mtmd.TokenizedPrompt
                          ) -> None:
        """The prompt indexed for prompt lookup, where its answer may draft: lookup on, and
        room for 2 tokens at least (a draft follows the next token)."""
        if self._lookup and request.max_tokens > 1:
            request.looked_up = prompt_index(prompt.chunks)

    def _predicted(self, text: str) -> Prediction:
        """The prediction's tokens as the model would write the text: no BOS, control-token
        text read as plain text. Only what an answer could reach of it is tokenized (a
        token stands for at most a few dozen characters)."""
        with self.gate:
            tokens = tokenize_text(self.model.vocab, text[:self.model.n_ctx * 32],
                                   add_special=False, parse_special=False)
        return Prediction.of(tokens[:self.model.n_ctx])

    def _checked(self, request: GenerationRequest, prompt: mtmd.TokenizedPrompt, fit: bool
                 ) -> mtmd.TokenizedPrompt:
        request.timer.prompt_tokens = prompt.n_tokens
        request.timer.image_tokens = prompt.image_tokens
        error = self._check_tokens(prompt) if fit else None
        if error is not None:
            prompt.close()
            raise PromptRefused(error)
        return prompt

    def _check_client_size(self, request: GenerationRequest) -> None:
        """_check_size on the users' own text, before rendering: rendering copies the text
        several times (tens of ms a 45 MB text, holding the GIL, so every stream waits),
        and the template only adds to it. (Other turns may be rendered in part: templates
        drop earlier reasoning from assistant turns.)"""
        texts = [request.prompt] if request.prompt is not None else [
            part for message in request.messages if message.role == "user"
            for part in message.parts if isinstance(part, str)]
        self._check_bytes(sum(_utf8_size(text) for text in texts))

    def _check_size(self, rendered: RenderedPrompt) -> None:
        """Refuse text that is certainly over the context: no token of this vocab stands for
        more than `max_token_bytes` bytes of text, so fewer tokens than bytes / that bound
        is impossible."""
        marker_bytes = len(self.model.media_marker.encode()) * len(rendered.images)
        self._check_bytes(sum(_utf8_size(s.text) for s in rendered.segments) - marker_bytes)

    def _check_bytes(self, n_bytes: int) -> None:
        bound = self.model.max_token_bytes
        if bound is None:
            return  # a normalizing vocab (may drop characters): no sound bound
        at_least = -(-n_bytes // bound)
        limit = self.model.n_ctx - 1
        if at_least > limit:
            raise PromptRefused(_too_long(f"at least {at_least} tokens", limit))

    def _check_tokens(self, prompt: mtmd.TokenizedPrompt) -> ErrorEvent | None:
        limit = self.model.n_ctx - 1
        if prompt.n_pos > limit:
            return _too_long(f"{prompt.n_tokens} tokens ({prompt.image_tokens} of them from "
                             "images)", limit)
        if not prompt.chunks:
            return ErrorEvent(400, "the prompt is empty")
        if prompt.chunks[-1].image is not None:
            return ErrorEvent(400, "the prompt must not end with an image")
        return None


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _too_long(size: str, limit: int) -> ErrorEvent:
    return ErrorEvent(
        400,
        f"the prompt is {size} but the context holds {limit}; shorten the "
        "conversation or send fewer/smaller images",
        code="context_length_exceeded",
    )
