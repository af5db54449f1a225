"""The Batch API's objects as OpenAI defines them (openai.types.Batch), for the OpenAPI
document; the tests validate what is emitted with the SDK's own types."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.expiry import ExpiresAfter

BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "failed",
                      "expired", "cancelling", "cancelled"]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    input_file_id: str = Field(max_length=128)
    endpoint: str = Field(max_length=128, examples=["/v1/chat/completions"])
    completion_window: str = Field("24h", max_length=16)
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: ExpiresAfter | None = None  # the output and error files'


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None  # 1-based line of the input file


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
