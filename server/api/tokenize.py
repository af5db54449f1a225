"""POST /tokenize and /detokenize (vLLM's extension, also served at the root as vLLM and
llama-server do): what a prompt costs before sending it, and the ids `logit_bias` and
`logprobs` speak in.

A chat is rendered exactly as POST /chat/completions renders it (template, the server's
system prompt, the tool prompt, images), so `count` is the `usage.prompt_tokens` the same
request would report. Tokenizing runs in a worker thread; the engine's slots are untouched.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.auth import client_identity
from server.api.errors import APIError, error_response
from server.api.generation import require_ready
from server.api.legacy_functions import legacy_tools
from server.api.messages import checked_text, to_engine_messages
from server.api.offloop_json import OffLoopJSONRoute
from server.api.openapi import responses
from server.api.response_format import answer_schema
from server.api.state import AppState
from server.api.template_kwargs import template_kwargs, with_reasoning_effort
from server.api.tokenize_protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.tool_calls import shown_tools, tool_history
from server.engine import ErrorEvent, GenerationRequest
from server.timings import StageTimer

router = APIRouter(route_class=OffLoopJSONRoute)


@router.post("/tokenize", response_model=TokenizeResponse,
             responses=responses(None, 400, 413, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> object:
    state: AppState = request.app.state.vlserve
    require_ready(state)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt (a text completion's) or messages (a "
                       "chat's)", param="prompt")
    client = client_identity(request.scope)
    timer = StageTimer()
    prompt = None if body.prompt is None else checked_text(body.prompt, "prompt")
    generation = GenerationRequest(messages=[], max_tokens=1, prompt=prompt, timer=timer,
                                   client=client,
                                   template_kwargs=with_reasoning_effort(
                                       template_kwargs(body.chat_template_kwargs),
                                       body.reasoning_effort, state.engine.template))
    if body.messages is not None:
        tools, tool_choice = legacy_tools(body.functions, body.function_call, body.tools,
                                          body.tool_choice)
        # Only the prompt counts: the tools it shows, not the grammar an answer would need.
        messages = tool_history(body.messages, shown_tools(
            tools, tool_choice, answer_schema(body.response_format)))
        names = ["tools"] * (len(messages) - len(body.messages)) + [
            f"messages.{i}.content" for i in range(len(body.messages))]
        generation.messages = await to_engine_messages(messages, state, timer, client, names)
    elif body.tools or body.functions or body.chat_template_kwargs or body.reasoning_effort:
        param = next(name for name in ("tools", "functions", "chat_template_kwargs",
                                       "reasoning_effort") if getattr(body, name))
        raise APIError(400, f"{param} shapes a chat: send messages", param=param)
    counted = await state.engine.tokenize(generation, add_special=body.add_special_tokens,
                                          pieces=body.return_token_strs)
    if isinstance(counted, ErrorEvent):
        return error_response(counted.status, counted.message, code=counted.code)
    return TokenizeResponse(count=counted.count, max_model_len=state.engine.info["n_ctx"],
                            tokens=list(counted.tokens),
                            token_strs=None if counted.pieces is None else list(counted.pieces),
                            image_tokens=counted.image_tokens)


@router.post("/detokenize", response_model=DetokenizeResponse,
             responses=responses(None, 400, 413, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> object:
    state: AppState = request.app.state.vlserve
    require_ready(state)
    n_vocab = state.engine.info["n_vocab"]
    tokens = body.tokens
    if tokens and not (min(tokens) >= 0 and max(tokens) < n_vocab):  # C loops, on the loop
        i = next(i for i, token in enumerate(tokens) if not 0 <= token < n_vocab)
        raise APIError(400, f"tokens.{i}: {tokens[i]} is not a token id of this model (0 to "
                       f"{n_vocab - 1})", param=f"tokens.{i}")
    return DetokenizeResponse(prompt=await state.engine.detokenize(body.tokens))
