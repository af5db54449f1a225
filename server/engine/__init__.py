"""The only code that touches llama-cpp-python. One thread owns the llama context."""

from server.engine.engine import Engine, EngineState
from server.engine.types import (
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
