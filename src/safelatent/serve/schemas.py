"""The service's request and response bodies (pydantic; they are the OpenAPI schema).

Static bounds here are the widest any server accepts; a server's own, tighter limits
(:class:`~safelatent.serve.settings.ServeLimits`) are checked per request and listed by ``GET /v1/models``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..api import MAX_SEED
from ..safety.gate import SLD_STRENGTH
from ..safety.policy_file import ACTIONS, CATEGORIES, HARD_CATEGORIES

#: a registered adapter's name: what clients send instead of a path
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

SLDName = Literal[SLD_STRENGTH]  # type: ignore[valid-type]
Category = Literal[CATEGORIES + HARD_CATEGORIES]  # type: ignore[valid-type]
Action = Literal[ACTIONS]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterChoice(_Strict):
    name: str = Field(
        pattern=ADAPTER_NAME_PATTERN,
        max_length=64,
        description="a registered adapter's name (GET /v1/models lists them); never a path",
    )
    weight: float = Field(1.0, ge=-4.0, le=4.0, allow_inf_nan=False)


class GenerateRequest(_Strict):
    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: str | None = Field(None, max_length=10_000)
    adapters: list[AdapterChoice] = Field(default_factory=list, max_length=16)
    sld: SLDName | None = Field(
        None,
        description="SLD preset; null = the server's default. Never weaker than the server's minimum or"
        " than a suppressed category needs (refused with 403).",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    count: int | None = Field(None, ge=1, le=256, description="images (null = the server's default)")
    steps: int | None = Field(None, ge=1, le=1000)
    width: int | None = Field(None, ge=8, le=8192)
    height: int | None = Field(None, ge=8, le=8192)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0, allow_inf_nan=False)
    policy_overrides: dict[Category, Action] = Field(
        default_factory=dict,
        description="per-category actions for this request; only stricter than the server's policy",
    )
    wait: bool = Field(True, description="true: answer when the images are ready; false: 202 + job id")


class ErrorBody(BaseModel):
    code: str
    message: str
    hint: str = ""


class ErrorResponse(BaseModel):
    error: ErrorBody


class Watermark(BaseModel):
    embedded: bool
    content_id: str | None = None
    reason: str | None = None


class ImageOut(BaseModel):
    index: int
    action: Literal["keep", "blur", "withhold"]
    reasons: list[str]
    scores: dict[str, dict[str, float]]
    png_base64: str | None
    watermark: Watermark
    c2pa: str


class ModelRef(BaseModel):
    name: str
    hash: str


class AdapterUsed(BaseModel):
    name: str
    weight: float
    hash: str | None = None


class Result(BaseModel):
    request_id: str
    seed: int | None
    seconds: float
    audit_row: int | None
    model: ModelRef
    sld: dict[str, Any] | None
    adapters: list[AdapterUsed]
    policy: dict[str, Any]
    warnings: list[str]
    images: list[ImageOut]


class Job(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    created: str
    finished: str | None = None
    result: Result | None = None
    error: ErrorBody | None = None


class QueueStats(BaseModel):
    queued: int
    running: int
    capacity: int
    workers: int
    completed: int


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    queue: QueueStats


class AdapterInfo(BaseModel):
    name: str
    kind: Literal["theme", "erasure"]
    trigger_words: list[str]
    erases: str | None = None


class PolicyInfo(BaseModel):
    name: str
    categories: dict[str, str]
    hard_blocked: list[str]
    minimum_sld: str


class Limits(BaseModel):
    max_steps: int
    max_images: int
    max_size: int
    size_multiple: int
    max_prompt_chars: int
    max_adapters: int
    min_weight: float
    max_weight: float


class Defaults(BaseModel):
    steps: int
    guidance_scale: float
    sld: str
    width: int
    height: int
    count: int


class ModelsResponse(BaseModel):
    model: dict[str, str]
    adapters: list[AdapterInfo]
    sld_presets: list[str]
    policy: PolicyInfo
    limits: Limits
    defaults: Defaults
