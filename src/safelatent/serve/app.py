"""``safelatent serve``: generation behind API keys, limits and a policy the client cannot weaken.

A FastAPI app over the same :class:`~safelatent.api.Pipeline` the CLI uses. Each ``POST /v1/generate``
is checked in this order, cheapest first:

1. **Key** (``Authorization: Bearer sl_…`` or ``X-API-Key``; stored hashed, :mod:`.api_keys`) → 401.
2. **Rate limit** (the key's requests per minute, token bucket) → 429 + ``Retry-After``.
3. **Bounds** (this server's :class:`~.settings.ServeLimits`: steps, size, count, prompt length,
   adapters by *registered name* only — no client ever sends a path) → 400; bodies over the limit → 413.
4. **Only more safety**: an SLD preset below the server's minimum → 403 (written to the audit log); the
   pipeline runs with ``only_stricter=True``, so an override below the policy's action or an SLD preset
   weaker than a suppressed category needs is refused (403) and logged; hard blocks are never relaxable.
5. **Quota** (images per UTC day) → 429; **queue** (bounded; ``concurrency`` workers, each with its own
   pipeline) → 429 + ``Retry-After`` when full.

Then the job runs through every security layer of the pipeline (prompt policy, SLD, output classifiers,
watermark, audit row; C2PA-signed PNGs when the policy signs). ``wait: true`` answers with the images;
``wait: false`` (or a job that outlasts ``wait_seconds``) answers 202 with a job id to poll.

The web page (``GET /``, ``static/``) uses only this API; no external URL is referenced anywhere, and the
interactive docs (which load scripts from a CDN) are off — the schema is at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidArgumentError
from ..models.adapters import LoraSpec, read_lora_info
from ..safety.gate import SLD_STRENGTH
from ..safety.layers import SecurityLayers, new_request_id
from ..safety.policy_file import (
    HARD_CATEGORIES,
    HardBlockRelaxationError,
    PromptBlockedError,
    SafetyRelaxationError,
)
from . import schemas
from .api_keys import ApiKey, ApiKeyStore
from .jobs import Job, JobQueue, QueueFull
from .rate_limit import RateLimiter, retry_after_header
from .settings import ServeSettings

__all__ = ["ApiError", "Service", "create_app"]

log = logging.getLogger("safelatent.serve")

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class ApiError(Exception):
    """An answer other than 2xx: ``{"error": {"code", "message", "hint"}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, hint: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


def error_from_exception(error: BaseException) -> ApiError:
    """What a failed job tells its client: policy refusals 403, bad parameters 400, the rest 500
    (without internals; the server log has the traceback)."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, PromptBlockedError):
        return ApiError(403, "prompt_blocked", error.what, error.hint or "change the prompt")
    if isinstance(error, HardBlockRelaxationError | SafetyRelaxationError):
        return ApiError(403, "forbidden_relaxation", error.what, error.hint or "")
    if isinstance(error, InvalidArgumentError):
        return ApiError(400, "bad_request", error.what, error.hint or "")  # the request's own arguments
    # anything else (missing keys, a locked audit log, a broken adapter file, a bug) is the server's:
    # its message may name server paths, so the client gets none of it
    return ApiError(500, "generation_failed", "the generation failed on the server", "try again later")


class Service:
    """The state behind the app: settings, keys, rate limiter, job queue and its pipelines."""

    def __init__(self, settings: ServeSettings, pipelines: list[Any], keys: ApiKeyStore) -> None:
        self.settings, self.keys, self.pipelines = settings, keys, pipelines
        self.limiter = RateLimiter()
        self.queue = JobQueue(pipelines, settings.limits.queue)
        first = pipelines[0]
        components = first.components
        # the model's file or folder name only: clients never see the server's paths
        self.model_name = "toy" if settings.model is None else Path(str(components.source)).name
        self.model_hash = components.model_hash
        self.architecture = components.architecture
        self.default_size = first.default_size
        self.size_multiple = components.vae_scale_factor
        self.policy = first.policy
        self.adapters = {name: _adapter_info(name, path) for name, path in settings.adapters.items()}

    # ---- request checks --------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key")
        record = self.keys.authenticate(key)
        if record is None:
            raise ApiError(
                401,
                "unauthorized",
                "a valid API key is required" if key else "no API key in the request",
                "send 'Authorization: Bearer <key>'; the operator makes keys with: safelatent keys add NAME",
                {"WWW-Authenticate": "Bearer"},
            )
        return record

    def check_rate(self, key: ApiKey) -> None:
        wait = self.limiter.acquire(key.id, key.requests_per_minute)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"key {key.name!r} allows {key.requests_per_minute:g} requests per minute",
                f"retry in {retry_after_header(wait)} s",
                {"Retry-After": retry_after_header(wait)},
            )

    def resolve(self, body: schemas.GenerateRequest) -> dict[str, Any]:
        """The request's generation arguments within this server's limits, or :class:`ApiError` 400/403."""
        limits = self.settings.limits
        max_size = limits.max_size or self.default_size
        count = body.count if body.count is not None else 1
        steps = body.steps if body.steps is not None else self.default_steps
        width = body.width if body.width is not None else self.default_size
        height = body.height if body.height is not None else self.default_size
        problems = []
        if len(body.prompt) > limits.max_prompt_chars:
            problems.append(
                f"the prompt has {len(body.prompt)} characters (at most {limits.max_prompt_chars})"
            )
        if body.negative_prompt is not None and len(body.negative_prompt) > limits.max_prompt_chars:
            problems.append(f"the negative prompt is longer than {limits.max_prompt_chars} characters")
        if count > limits.max_images:
            problems.append(f"count {count} is above this server's {limits.max_images}")
        if steps > limits.max_steps:
            problems.append(f"steps {steps} is above this server's {limits.max_steps}")
        for name, value in (("width", width), ("height", height)):
            if value > max_size or value % self.size_multiple:
                problems.append(f"{name} {value} is not a multiple of {self.size_multiple} up to {max_size}")
        if len(body.adapters) > limits.max_adapters:
            problems.append(f"{len(body.adapters)} adapters (at most {limits.max_adapters})")
        names = [a.name for a in body.adapters]
        if len(set(names)) != len(names):
            problems.append("an adapter is listed twice")
        for adapter in body.adapters:
            if adapter.name not in self.adapters:
                problems.append(f"unknown adapter {adapter.name!r}")
            elif self.adapters[adapter.name]["kind"] == "erasure" and adapter.weight < 0:
                raise ApiError(
                    403,
                    "forbidden_relaxation",
                    f"request refused: adapter {adapter.name!r} erases "
                    f"{self.adapters[adapter.name]['erases']!r}; a negative weight would add it back",
                    "use a weight ≥ 0 for an erasure adapter",
                )
            if not limits.min_weight <= adapter.weight <= limits.max_weight:
                bounds = f"[{limits.min_weight:g}, {limits.max_weight:g}]"
                problems.append(f"adapter weight {adapter.weight:g} is outside {bounds}")
        if problems:
            raise ApiError(
                400, "bad_request", "; ".join(problems), "GET /v1/models lists this server's limits"
            )
        return {
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "adapters": [(a.name, a.weight) for a in body.adapters],
            "sld": body.sld,  # None: the server's default, raised by the policy when a prompt needs it
            "seed": body.seed,
            "num_images_per_prompt": count,
            "num_inference_steps": steps,
            "guidance_scale": body.guidance_scale
            if body.guidance_scale is not None
            else self.default_guidance_scale,
            "width": width,
            "height": height,
            "policy_overrides": dict(body.policy_overrides),
        }

    def refuse_below_minimum_sld(self, key: ApiKey, args: dict[str, Any]) -> None:
        """403 (and an audit row) for an SLD preset weaker than this server's minimum."""
        minimum = self.settings.minimum_sld
        if args["sld"] is None or SLD_STRENGTH.index(args["sld"]) >= SLD_STRENGTH.index(minimum):
            return
        message = (
            f"request refused: it asks for SLD {args['sld']!r}, but this server applies at least {minimum!r};"
            " a request may ask for more safety, never less"
        )
        SecurityLayers(self.policy).record(
            request_id=new_request_id(),
            prompts=[args["prompt"]],
            decisions=None,
            settings={**args, "client": key.name},
            model_hash=self.model_hash,
            refusal=message,
        )
        raise ApiError(403, "forbidden_relaxation", message, f"ask for SLD {minimum!r} or stronger")

    def reserve(self, key: ApiKey, count: int) -> str:
        """Charge ``count`` images to today's quota; returns the day charged (refunds go to that day)."""
        day = self.keys.reserve_images(key, count)
        if day is None:
            now = datetime.now(UTC)
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
            wait = retry_after_header((midnight - now).total_seconds())
            raise ApiError(
                429,
                "quota_exceeded",
                f"key {key.name!r} may generate {key.images_per_day} images per day (UTC)",
                f"the quota resets at 00:00 UTC (in {wait} s)",
                {"Retry-After": wait},
            )
        return day

    # ---- jobs ------------------------------------------------------------------------------------------

    def submit(self, key: ApiKey, args: dict[str, Any]) -> Job:
        job = Job(owner=key.id, run=lambda pipe: None)
        job.run = self._runner(key, job, args)
        try:
            return self.queue.submit(job)
        except QueueFull as full:
            self.keys.release_images(key, args["num_images_per_prompt"], args["quota_day"])
            raise ApiError(
                429,
                "queue_full",
                f"the server is busy ({self.queue.capacity} jobs queued or running)",
                f"retry in {retry_after_header(full.retry_after)} s",
                {"Retry-After": retry_after_header(full.retry_after)},
            ) from None

    def _runner(self, key: ApiKey, job: Job, args: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
        def run(pipe: Any) -> dict[str, Any]:
            try:
                self._use_adapters(pipe, args["adapters"])
                result = pipe.generate(
                    args["prompt"],
                    negative_prompt=args["negative_prompt"],
                    num_images_per_prompt=args["num_images_per_prompt"],
                    num_inference_steps=args["num_inference_steps"],
                    guidance_scale=args["guidance_scale"],
                    sld=args["sld"],
                    default_sld=self.settings.default_sld,
                    seed=args["seed"],
                    width=args["width"],
                    height=args["height"],
                    policy_overrides=args["policy_overrides"] or None,
                    only_stricter=True,
                    audit_context={"client": key.name, "job": job.id},
                )
                return self._result_json(result)
            except BaseException as error:
                self.keys.release_images(key, args["num_images_per_prompt"], args["quota_day"])
                if error_from_exception(error).status >= 500:
                    log.exception("job %s failed", job.id)
                raise

        return run

    def _use_adapters(self, pipe: Any, wanted: list[tuple[str, float]]) -> None:
        """Apply the request's registered adapters (nothing to do when the pipeline has exactly that set)."""
        specs = [LoraSpec(self.settings.adapters[name], weight, name) for name, weight in wanted]
        active = [(lora.path.resolve(), lora.weight, lora.name) for lora in pipe.loras]
        if active != [(spec.path.resolve(), spec.weight, spec.display_name) for spec in specs]:
            pipe.set_loras(specs)

    def _result_json(self, result: Any) -> dict[str, Any]:
        from ..output import encode_result

        pngs = encode_result(result, result.request_id)
        settings = result.settings
        images = []
        for index, data in enumerate(pngs):
            safety = result.safety_of(index)
            images.append(
                {
                    "index": index,
                    "action": safety.action if safety else "keep",
                    "reasons": list(safety.reasons) if safety else [],
                    "scores": safety.scores if safety else {},
                    "png_base64": None if data is None else base64.b64encode(data).decode("ascii"),
                    "watermark": (
                        safety.as_dict()["watermark"] if safety else {"embedded": False, "reason": "none"}
                    ),
                    "c2pa": _c2pa_for_clients(data, result.c2pa_status),
                }
            )
        return {
            "request_id": result.request_id,
            "seed": settings.seed,
            "seconds": round(result.seconds, 3),
            "audit_row": result.audit_row,
            "model": {"name": self.model_name, "hash": settings.model_hash},
            "sld": settings.sld,
            "adapters": [
                {"name": lora["name"], "weight": lora["weight"], "hash": lora.get("hash")}
                for lora in settings.loras
            ],
            "policy": settings.policy or {},
            "warnings": list(result.warnings),
            "images": images,
        }

    def job_json(self, job: Job) -> dict[str, Any]:
        error = None
        if job.error is not None:
            error = error_from_exception(job.error).body()["error"]
        return {
            "job_id": job.id,
            "status": job.status,
            "created": job.created,
            "finished": job.finished,
            "result": job.result,
            "error": error,
        }

    # ---- listings --------------------------------------------------------------------------------------

    @property
    def default_steps(self) -> int:
        limits = self.settings.limits
        if self.settings.default_steps is not None:
            return min(self.settings.default_steps, limits.max_steps)
        return min(25 if self.settings.model is None else 30, limits.max_steps)

    @property
    def default_guidance_scale(self) -> float:
        if self.settings.default_guidance_scale is not None:
            return self.settings.default_guidance_scale
        if self.settings.model is None:
            from ..toy.model import TOY_CFG_SCALE

            return TOY_CFG_SCALE
        return 7.5

    def models_json(self) -> dict[str, Any]:
        limits, policy = self.settings.limits, self.policy
        return {
            "model": {"name": self.model_name, "hash": self.model_hash, "architecture": self.architecture},
            "adapters": list(self.adapters.values()),
            "sld_presets": list(SLD_STRENGTH),
            "policy": {
                "name": policy.name,
                "categories": {c: p.action for c, p in policy.categories.items() if c not in HARD_CATEGORIES},
                "hard_blocked": list(HARD_CATEGORIES),
                "minimum_sld": self.settings.minimum_sld,
            },
            "limits": {
                "max_steps": limits.max_steps,
                "max_images": limits.max_images,
                "max_size": limits.max_size or self.default_size,
                "size_multiple": self.size_multiple,
                "max_prompt_chars": limits.max_prompt_chars,
                "max_adapters": limits.max_adapters,
                "min_weight": limits.min_weight,
                "max_weight": limits.max_weight,
            },
            "defaults": {
                "steps": self.default_steps,
                "guidance_scale": self.default_guidance_scale,
                "sld": self.settings.default_sld,
                "width": self.default_size,
                "height": self.default_size,
                "count": 1,
            },
        }


def _c2pa_for_clients(data: bytes | None, status: str | None) -> str:
    """Whether the PNG carries a signed C2PA manifest — without the server's key paths."""
    if data is None:
        return "not signed: image withheld"
    if status and status.startswith("signed"):
        return "signed: C2PA manifest in the PNG (check it with `safelatent verify`)"
    return "not signed: this server's policy does not sign, or it has no signing keys"


def _adapter_info(name: str, path: Any) -> dict[str, Any]:
    info = read_lora_info(path)
    erasure = info.get("erasure") or {}
    return {
        "name": name,
        "kind": "erasure" if erasure else "theme",
        "trigger_words": [str(w) for w in info.get("trigger_words") or []],
        "erases": erasure.get("concept"),
    }


class ServiceMiddleware:
    """ASGI middleware: the security headers on every response, and 413 for request bodies over
    ``limit`` bytes (declared or streamed). Pure ASGI: a BaseHTTPMiddleware in between would turn the
    413 raised while FastAPI reads a streamed body into its generic 400."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(send)
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # FastAPI re-raises its HTTPException from the body read
                    raise HTTPException(413, f"the request body is larger than {self.limit} bytes")
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [
                    (name.lower().encode(), value.encode())
                    for name, value in _SECURITY_HEADERS.items()
                    if name.lower().encode() not in present
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except StarletteHTTPException as error:  # a body read outside a route (routes answer it)
            if error.status_code != 413 or started:
                raise
            await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        error = ApiError(413, "too_large", f"the request body is larger than {self.limit} bytes")
        response = JSONResponse(error.body(), status_code=413, headers=_SECURITY_HEADERS)
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def _current_key(request: Request) -> ApiKey:
    return request.app.state.service.authenticate(request)


#: the request's API key (401 without a valid one)
CurrentKey = Annotated[ApiKey, Depends(_current_key)]

_ERRORS = {
    code: {"model": schemas.ErrorResponse, "description": text}
    for code, text in {
        400: "a parameter outside this server's limits, an unknown adapter, malformed JSON",
        401: "no or an invalid API key",
        403: "the prompt is blocked, or the request asks for less safety than the policy gives",
        404: "no such job for this key",
        413: "the body is too large",
        429: "rate limit, daily quota or job queue full (see Retry-After)",
    }.items()
}


def create_app(
    settings: ServeSettings | None = None,
    *,
    pipelines: list[Any] | None = None,
    keys: ApiKeyStore | None = None,
) -> FastAPI:
    """The app for ``settings`` (default: the toy model). ``pipelines`` (one per worker) are loaded from
    ``settings.model`` when not given; ``keys`` defaults to the store at ``settings.keys_db``."""
    from .. import __version__
    from ..api import load

    settings = settings or ServeSettings()
    if pipelines is None:
        pipelines = [
            load(
                settings.model,
                device=settings.device,
                config_dir=settings.model_config,
                policy=settings.policy_name,
                prediction_type=settings.prediction_type,
                vae=settings.vae,
            )
            for _ in range(settings.limits.concurrency)
        ]
    service = Service(settings, pipelines, keys or ApiKeyStore(settings.keys_db))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.queue.close)

    app = FastAPI(
        title="safelatent",
        version=__version__,
        description="Image generation behind API keys, limits and a policy the client cannot weaken.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service

    app.add_middleware(ServiceMiddleware, limit=settings.limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors()[:5]:
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            problems.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
        body = ApiError(400, "bad_request", "; ".join(problems), "see /openapi.json for the request schema")
        return JSONResponse(body.body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        body = ApiError(500, "internal_error", "the server could not answer this request", "try again later")
        return JSONResponse(body.body(), status_code=500, headers=_SECURITY_HEADERS)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            error.status_code, "http_error"
        )
        body = ApiError(error.status_code, code, str(error.detail))
        return JSONResponse(
            body.body(), status_code=error.status_code, headers=getattr(error, "headers", None)
        )

    @app.get("/v1/health", response_model=schemas.Health, tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness and queue load; no key needed."""
        return {"status": "ok", "model": service.model_hash, "queue": service.queue.stats()}

    @app.get("/v1/models", response_model=schemas.ModelsResponse, responses=_ERRORS, tags=["service"])
    async def models(key: CurrentKey) -> dict[str, Any]:
        """The model, the registered adapters, SLD presets, the policy, this server's limits and defaults."""
        return service.models_json()

    @app.post(
        "/v1/generate",
        response_model=schemas.Job,
        responses={**_ERRORS, 202: {"model": schemas.Job, "description": "queued; poll /v1/jobs/{job_id}"}},
        tags=["generation"],
    )
    async def generate(body: schemas.GenerateRequest, key: CurrentKey):
        """Generate images through every security layer. ``wait: true``: 200 with the images (or 202 when
        the job outlasts the server's wait); ``wait: false``: 202 with the job id at once."""
        service.check_rate(key)
        args = service.resolve(body)
        service.refuse_below_minimum_sld(key, args)
        args["quota_day"] = service.reserve(key, args["num_images_per_prompt"])
        job = service.submit(key, args)
        if body.wait:
            # the job's own exception is read from the job below, never from this wait
            await asyncio.wait([asyncio.wrap_future(job.future)], timeout=settings.limits.wait_seconds)
        if job.status == "failed":  # the client gets its error (never internals)
            raise error_from_exception(job.error)
        if job.status == "done":
            return service.job_json(job)
        return JSONResponse(
            service.job_json(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
        )

    @app.get("/v1/jobs/{job_id}", response_model=schemas.Job, responses=_ERRORS, tags=["generation"])
    async def job_status(job_id: str, key: CurrentKey) -> dict[str, Any]:
        """A job of this key: queued, running, done (with the result) or failed (with the error)."""
        job = service.queue.get(job_id)
        if job is None or job.owner != key.id:
            raise ApiError(
                404, "not_found", f"no job {job_id[:64]!r} for this key", "jobs are kept 10 minutes"
            )
        return service.job_json(job)

    static = resources.files("safelatent.serve") / "static"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app
