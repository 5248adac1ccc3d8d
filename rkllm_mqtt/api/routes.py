"""The Ollama API's endpoints, on the bridge's scheduler.

Requests are checked here (authorization, body, model, limits) and turned into a generation request; each
generation becomes a :class:`~rkllm_mqtt.core.jobs.Job` with an ``http-…`` id on the same scheduler as MQTT
requests (the same admission, FIFO, single flight, limits, counters and abort), answered by
:class:`~rkllm_mqtt.api.relay.JobRelay`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from rkllm_mqtt import __version__
from rkllm_mqtt.api import catalog
from rkllm_mqtt.api.answers import ChatAnswer, GenerateAnswer
from rkllm_mqtt.api.chat import ConversationError, Markup
from rkllm_mqtt.api.conversation import Conversations
from rkllm_mqtt.api.formats import AnswerFormat, FormatError
from rkllm_mqtt.api.relay import NDJSON, JobDesk, JobRelay, Turn, error_response, ndjson_line
from rkllm_mqtt.api.shapes import ChatBody, GenerateBody, ModelBody, Options, describe
from rkllm_mqtt.core.jobs import GenerationRequest
from rkllm_mqtt.core.runtime_view import RuntimeStatusView
from rkllm_mqtt.errors import ErrorCode
from rkllm_mqtt.payloads import ModelInfo
from rkllm_mqtt.settings import Settings

log = structlog.get_logger(__name__)

# The Ollama API version whose shapes this server follows (clients may compare it with a minimum).
OLLAMA_API_VERSION = "0.12.0"

B = TypeVar("B", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class OllamaApi:
    """The handlers. Everything runs on the server's event loop; the scheduler is only called, never waited on."""

    def __init__(self, settings: Settings, desk: JobDesk, runtime: RuntimeStatusView) -> None:
        self.settings = settings
        self.desk = desk
        self.runtime = runtime
        rt = settings.runtime
        self.markup = Markup.for_template(rt.prompt_prefix, rt.prompt_postfix)
        self.conversations = Conversations(self.markup)
        self.relay = JobRelay(desk, self.conversations)
        token = settings.api.token
        self._token = f"Bearer {token.get_secret_value()}".encode() if token is not None else None

    # -- the application ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth])
        app.on_response_prepare.append(self._name_server)
        app.router.add_get("/", self.root)
        app.router.add_get("/api/version", self.version)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.ps)
        app.router.add_post("/api/show", self.show)
        app.router.add_post("/api/pull", self.pull)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_post("/api/generate", self.generate)
        return app

    @staticmethod
    async def _name_server(request: web.Request, response: web.StreamResponse) -> None:
        # Says which server answers (doctor tells this bridge from an Ollama on the same port by it).
        response.headers["Server"] = f"rkllm-mqtt/{__version__}"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._token):
                log.warning("api_unauthorized", path=request.path, remote=request.remote)
                return error_response(401, "unauthorized: send 'Authorization: Bearer <api.token>'")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.code is not None:
                self.desk.record_rejection(exc.code)
            log.info("api_refused", path=request.path, status=exc.status, error=exc.message)
            return error_response(exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.status >= 400:
                return error_response(exc.status, f"{request.method} {request.path}: {exc.reason.lower()}")
            raise
        except ConnectionResetError:
            # The client went away while its answer was written (its job was cancelled on the way out).
            return web.Response(status=499)
        except Exception:  # the daemon never fails on a request: say so in Ollama's shape and log it
            log.exception("api_handler_failed", path=request.path)
            return error_response(500, "internal error while handling the request")

    # -- helpers -------------------------------------------------------------------------------------------

    async def _body(self, request: web.Request, model: type[B]) -> B:
        raw = await request.read()
        try:
            data = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"the body is not valid UTF-8 (byte {exc.start})", "invalid_utf8") from exc
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", "invalid_json") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ApiError(400, describe(exc), "invalid_request") from exc

    def _loaded(self, requested: str) -> ModelInfo:
        """The loaded model if ``requested`` names it: 404 for another model, 503 while none is loaded."""
        info = self.runtime.model_info
        if info is None:
            raise ApiError(503, self._not_ready_message())
        if not catalog.matches(requested, info.model_name):
            loaded = catalog.ollama_name(info.model_name)
            raise ApiError(404, f"model '{requested}' not found; this server runs '{loaded}'")
        return info

    def _not_ready_message(self) -> str:
        status = self.runtime.status
        if status == "failed":
            return f"the runtime failed to start: {self.runtime.last_error}"
        return f"the runtime is {status}; try again in a moment"

    def _template_text(self) -> str:
        rt = self.settings.runtime
        if rt.prompt_prefix is None and rt.prompt_postfix is None:
            return (
                "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
            )
        return f"{rt.prompt_prefix or ''}{{{{ .Prompt }}}}{rt.prompt_postfix or ''}"

    def _check_size(self, *texts: str) -> None:
        limit = self.settings.limits.max_prompt_bytes
        size = max(len(t.encode("utf-8")) for t in texts)
        if size > limit:
            raise ApiError(
                400,
                f"the prompt is {size} bytes; the limit is {limit} (limits.max_prompt_bytes)",
                "prompt_too_long",
            )

    # -- model endpoints -------------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="Ollama is running")

    async def version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"version": OLLAMA_API_VERSION})

    async def tags(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(catalog.tags(self.runtime.model_info))

    async def ps(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(catalog.running(self.runtime.model_info, self.runtime.status == "ready"))

    async def show(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, ModelBody)
        info = self._loaded(body.target)
        return web.json_response(catalog.show(info, self._template_text()))

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, ModelBody)
        info = self.runtime.model_info
        if info is None or not catalog.matches(body.target, info.model_name):
            loaded = catalog.ollama_name(info.model_name) if info else "none yet"
            raise ApiError(
                404,
                f"model '{body.target}' cannot be pulled: this server runs the model it loaded ({loaded}); "
                "set runtime.model_path to serve another",
            )
        if not body.stream:
            return web.json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
        await response.write(ndjson_line({"status": "success"}))
        await response.write_eof()
        return response

    # -- generation --------------------------------------------------------------------------------------------

    def _require_ready(self) -> None:
        if self.runtime.status != "ready":
            raise ApiError(503, self._not_ready_message(), "not_ready")

    @staticmethod
    def _answer_format(spec: Any) -> AnswerFormat | None:
        try:
            return AnswerFormat.from_request(spec)
        except FormatError as exc:
            raise ApiError(400, str(exc), "invalid_request") from exc

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, ChatBody)
        info = self._loaded(body.model)
        answer = ChatAnswer(catalog.ollama_name(info.model_name), thinking=body.thinking)
        if not body.messages:  # Ollama's way to load (or, keep_alive 0, unload) a model
            return web.json_response(answer.loaded("unload" if body.keep_alive in (0, "0") else "load"))
        self._require_ready()
        fmt = self._answer_format(body.format)
        tools = json.dumps(body.tools, ensure_ascii=False) if body.tools else None
        try:
            plan = self.conversations.plan(body.messages, tools, fmt.instruction() if fmt else "")
        except ConversationError as exc:
            raise ApiError(400, str(exc), "invalid_request") from exc
        self._check_size(plan.prompt, plan.replay)
        options = body.options or Options()
        generation = GenerationRequest(
            prompt=plan.prompt,
            timeout_s=self.settings.limits.request_timeout_s,
            session=plan.session,
            system=plan.system,
            max_new_tokens=options.max_new_tokens(),
            sampling=options.sampling(),
            tools=tools,
            enable_thinking=body.thinking,
            role=plan.role,
            replay_prompt=plan.replay,
        )
        return await self.relay.serve(request, generation, Turn(answer, body.stream, fmt, plan, tools))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, GenerateBody)
        info = self._loaded(body.model)
        answer = GenerateAnswer(catalog.ollama_name(info.model_name), thinking=body.thinking)
        if not body.prompt:
            return web.json_response(answer.loaded("unload" if body.keep_alive in (0, "0") else "load"))
        self._require_ready()
        if body.images:
            raise ApiError(400, "images are not supported: the loaded model reads text only", "invalid_request")
        fmt = self._answer_format(body.format)
        prompt = body.prompt + (fmt.instruction() if fmt else "")
        self._check_size(prompt)
        options = body.options or Options()
        generation = GenerationRequest(
            prompt=prompt,
            timeout_s=self.settings.limits.request_timeout_s,
            system=body.system,
            max_new_tokens=options.max_new_tokens(),
            sampling=options.sampling(),
            enable_thinking=body.thinking,
        )
        return await self.relay.serve(request, generation, Turn(answer, body.stream, fmt, None, None))
