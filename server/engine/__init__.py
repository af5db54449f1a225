"""The only code that touches llama-cpp-python. One thread owns the llama context."""

from server.engine.engine import Engine, EngineState
from server.engine.types import (
    ChatMessage,
    DoneEvent,
    EngineEvent,
    ErrorEvent,
    GenerationRequest,
    ImageInput,
    PromptTokens,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "ChatMessage",
    "DoneEvent",
    "Engine",
    "EngineEvent",
    "EngineState",
    "ErrorEvent",
    "GenerationRequest",
    "ImageInput",
    "PromptTokens",
    "SamplingParams",
    "TokenEvent",
]
