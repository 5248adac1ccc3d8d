"""The bridge: requests in, single-flight scheduling, responses and status out.

Two threads own the work. The dispatcher takes everything that arrives (MQTT messages, connects,
runtime changes) from one inbox, validates and admits requests, and answers rejections; the runner
takes admitted requests from a bounded FIFO one at a time and drives the runtime supervisor. The
paho thread and the supervisor's threads only put items in the inbox.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import random
import threading
import time
from dataclasses import dataclass

import structlog

from rkllm_mqtt import __version__
from rkllm_mqtt.bridge.cluster import PeerTable
from rkllm_mqtt.bridge.publisher import Publisher, Publishing
from rkllm_mqtt.bridge.requests import Rejection, Request, RequestRules, parse_request
from rkllm_mqtt.bridge.streaming import ChunkStreamer
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.errors import ErrorCode, RequestError
from rkllm_mqtt.ha import discovery as ha
from rkllm_mqtt.payloads import (
    ErrorEvent,
    ErrorInfo,
    FinalResponse,
    FinalState,
    HealthPayload,
    RequestStatus,
    StatePayload,
    Timing,
    Usage,
)
from rkllm_mqtt.runtime.supervisor import RuntimeSupervisor
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import Topics

log = structlog.get_logger(__name__)

INBOX_SIZE = 10000
RUNTIME_ERROR_CODES: frozenset[ErrorCode] = frozenset({"runtime_error", "runtime_crashed", "runtime_hung"})
STALE_CONFIG_WAIT_S = 3.0


@dataclass(frozen=True)
class _Connected:
    pass


@dataclass(frozen=True)
class _RuntimeChanged:
    pass


@dataclass(frozen=True)
class _Announce:
    pass


@dataclass(frozen=True)
class _ClearStaleConfigs:
    pass


@dataclass(frozen=True)
class _Ping:
    sent_at: float


@dataclass(frozen=True)
class _Stop:
    pass


InboxItem = IncomingMessage | _Connected | _RuntimeChanged | _Announce | _ClearStaleConfigs | _Ping | _Stop


def _final_state(code: ErrorCode | None) -> FinalState:
    if code is None:
        return "done"
    if code == "aborted":
        return "aborted"
    if code == "timeout":
        return "timeout"
    return "error"


class Bridge:
    def __init__(self, settings: Settings, supervisor: RuntimeSupervisor) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.topics = Topics(settings.mqtt.base_topic, settings.mqtt.node_id)
        self.rules = RequestRules(
            max_prompt_bytes=settings.limits.max_prompt_bytes,
            request_timeout_s=settings.limits.request_timeout_s,
            reply_prefixes=tuple(settings.reply_prefixes()),
            forbidden_roots=(settings.homeassistant.discovery_prefix, self.topics.root),
        )
        self.publisher: Publisher | None = None
        self.peers = PeerTable(self.topics)
        self._inbox: queue.Queue[InboxItem] = queue.Queue(INBOX_SIZE)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: collections.deque[Request] = collections.deque()
        self._current: Request | None = None
        self._current_started: float | None = None
        self._current_cancel: CancelToken | None = None
        self._stopping = False
        self._dispatcher: threading.Thread | None = None
        self._runner: threading.Thread | None = None
        self._started_at = time.monotonic()
        self._requests_total = 0
        self._errors_total = 0
        self._last_tokens_per_s: float | None = None
        self._last_ttft_ms: float | None = None
        self._last_final: FinalResponse | None = None
        self._last_error: str | None = None
        self._announced_model: str | None = None
        self._seen_configs: set[str] = set()
        self._last_ping_handled = time.monotonic()

    # -- wiring ---------------------------------------------------------------------------------

    def attach(self, transport: Publishing) -> None:
        self.publisher = Publisher(transport, self.topics)

    def subscriptions(self) -> list[str]:
        topics = [self.topics.prompt, self.topics.abort, self.topics.clear]
        if self.settings.cluster.enabled:
            topics.append(self.topics.shared_group_prompt(self.settings.cluster.group))
            topics.extend(self.peers.subscriptions())
        topics.append(ha.ha_status_topic(self.settings))
        topics.extend(ha.discovery_subscriptions(self.settings))
        return topics

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="bridge-dispatch", daemon=True)
        self._runner = threading.Thread(target=self._run_loop, name="bridge-runner", daemon=True)
        self._dispatcher.start()
        self._runner.start()

    # -- hand-over points for foreign threads -------------------------------------------------------

    def _put(self, item: InboxItem) -> None:
        try:
            self._inbox.put(item, timeout=5.0)
        except queue.Full:
            log.error("inbox_full_dropped", item=type(item).__name__, size=INBOX_SIZE)

    def on_message(self, message: IncomingMessage) -> None:
        self._put(message)

    def on_connected(self) -> None:
        self._put(_Connected())

    def on_runtime_change(self) -> None:
        self._put(_RuntimeChanged())

    # -- status ----------------------------------------------------------------------------------------

    @property
    def current_request_id(self) -> str | None:
        current = self._current
        return current.id if current else None

    def healthy(self, now: float | None = None) -> bool:
        """For the systemd watchdog: the dispatcher answers, the runner is not wedged."""
        now = time.monotonic() if now is None else now
        threads_alive = all(t is not None and t.is_alive() for t in (self._dispatcher, self._runner))
        self._put(_Ping(now))
        dispatcher_ok = now - self._last_ping_handled < 60.0
        runner_ok = True
        current, started = self._current, self._current_started
        if current is not None and started is not None:
            # A run is bounded by its timeout plus the hang grace; beyond that (with margin) it is wedged.
            bound = current.timeout_s + self.settings.limits.hang_grace_s + 60.0
            runner_ok = now - started < bound
        return threads_alive and dispatcher_ok and runner_ok and self.supervisor.alive()

    def state_payload(self) -> StatePayload:
        runtime = self.supervisor.status
        with self._lock:
            current = self._current
            depth = len(self._queue)
        if current is not None:
            status = "busy"
        elif runtime == "failed":
            status = "error"
        elif runtime in ("loading", "restarting"):
            status = "loading"
        else:
            status = "idle"
        return StatePayload(
            status=status,
            request_id=current.id if current else None,
            queue_depth=depth,
            requests_total=self._requests_total,
            errors_total=self._errors_total,
            tokens_per_s=self._last_tokens_per_s,
            ttft_ms=self._last_ttft_ms,
        )

    def health_payload(self) -> HealthPayload:
        runtime = self.supervisor.status
        status = {"ready": "ok", "failed": "error"}.get(runtime, "degraded")
        return HealthPayload(
            status=status,
            runtime=runtime,
            uptime_s=round(time.monotonic() - self._started_at, 1),
            last_error=self.supervisor.last_error if runtime != "ready" else self._last_error,
            restarts=self.supervisor.restarts,
            version=__version__,
        )

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        state = self.state_payload()
        model = self.supervisor.model_info
        runtime = f"runtime {self.supervisor.status}"
        if model is not None:
            runtime += f" ({model.model_name}, abi {model.abi})"
        parts = [runtime]
        parts.append(f"{state.status}, queue {state.queue_depth}, {state.requests_total} requests")
        error = self.supervisor.last_error or self._last_error
        if error:
            parts.append(f"last error: {error[:120]}")
        return "; ".join(parts)

    # -- dispatcher -------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if isinstance(item, _Stop):
                return
            try:
                self._dispatch(item)
            except Exception:  # the daemon never crashes on input: log it and go on
                log.exception("dispatch_failed", item=type(item).__name__)

    def _dispatch(self, item: InboxItem) -> None:
        if isinstance(item, IncomingMessage):
            self._handle_message(item)
        elif isinstance(item, _Connected):
            self._publish_all_status()
            self._announce()
            threading.Timer(STALE_CONFIG_WAIT_S, self._put, args=(_ClearStaleConfigs(),)).start()
        elif isinstance(item, _RuntimeChanged):
            self._on_runtime_changed()
        elif isinstance(item, _Announce):
            self._publish_all_status()
            self._announce()
        elif isinstance(item, _ClearStaleConfigs):
            self._clear_stale_configs()
        elif isinstance(item, _Ping):
            self._last_ping_handled = item.sent_at

    def _handle_message(self, message: IncomingMessage) -> None:
        topic = message.topic
        if self.settings.cluster.enabled and topic == self.topics.group_prompt and self._hand_off(message):
            return
        if topic == self.topics.prompt or (self.settings.cluster.enabled and topic == self.topics.group_prompt):
            if message.retain:
                self._reject(Rejection("invalid_request", "retained prompts are ignored: publish without retain"))
                return
            with self._lock:
                self._requests_total += 1
            parsed = parse_request(
                message.payload,
                rules=self.rules,
                received_at=message.received_at,
                property_reply_topic=message.response_topic,
                correlation_data=message.correlation_data,
            )
            if isinstance(parsed, Rejection):
                self._reject(parsed)
            else:
                self._admit(parsed)
        elif topic == self.topics.abort:
            if not message.retain:
                self._abort(message.payload.decode("utf-8", errors="replace").strip() or None)
        elif topic == self.topics.clear:
            if not message.retain:
                self._clear(message.payload.decode("utf-8", errors="replace").strip() or None)
        elif topic == ha.ha_status_topic(self.settings):
            if ha.is_ha_online(message.payload) and self.settings.homeassistant.enabled:
                # Spread the re-announce: many devices answer the same birth message at once.
                delay = random.uniform(1.0, 5.0)
                threading.Timer(delay, self._put, args=(_Announce(),)).start()
        elif self.settings.cluster.enabled and self.peers.observe(topic, message.payload):
            pass
        elif ha.is_own_config_topic(self.settings, topic):
            if message.payload:
                self._seen_configs.add(topic)
            else:
                self._seen_configs.discard(topic)
        # Anything else (amqtt re-sends unrelated retained messages to new subscriptions) is ignored.

    def _hand_off(self, message: IncomingMessage) -> bool:
        """Pass a group request this node cannot start now to an idle peer. True when it was passed on."""
        with self._lock:
            busy = self._current is not None or bool(self._queue) or self.supervisor.status != "ready"
        if not busy or message.retain:
            return False
        peer = self.peers.pick_idle()
        if peer is None:
            return False  # every node is busy: queue it here (or answer queue_full), nothing is lost
        assert self.publisher is not None
        target = Topics(self.topics.base, peer).prompt
        self.publisher.forward(target, message.payload, message.response_topic, message.correlation_data)
        log.info("request_handed_off", peer=peer, topic=target)
        return True

    # -- admission ----------------------------------------------------------------------------------------

    def _admit(self, request: Request) -> None:
        rejection: Rejection | None = None
        position = 0
        with self._lock:
            if self._stopping:
                rejection = Rejection("not_ready", "the bridge is shutting down", request.id, request.reply_topic)
            elif self.supervisor.status == "failed":
                rejection = Rejection(
                    "not_ready",
                    f"runtime failed to start: {self.supervisor.last_error}",
                    request.id,
                    request.reply_topic,
                )
            elif (refusal := self.supervisor.unsupported_reason(self._generation_request(request))) is not None:
                rejection = Rejection("unsupported", refusal, request.id, request.reply_topic)
            elif (self._current is not None and self._current.id == request.id) or any(
                queued.id == request.id for queued in self._queue
            ):
                rejection = Rejection(
                    "invalid_request", f"id {request.id} is already in use by a pending request", None, None
                )
            elif len(self._queue) >= self.settings.limits.queue_size:
                rejection = Rejection(
                    "queue_full",
                    f"{len(self._queue)} requests are waiting (limits.queue_size = {self.settings.limits.queue_size})",
                    request.id,
                    request.reply_topic,
                )
            else:
                position = len(self._queue) + (1 if self._current is not None else 0)
                # "queued" goes out before the runner can see the request, so it always precedes "started".
                assert self.publisher is not None
                reply = self.publisher.reply_topics(request.id, request.reply_topic)
                self.publisher.status(
                    reply, RequestStatus(id=request.id, status="queued", position=position), request.correlation_data
                )
                self._queue.append(request)
                self._work.notify()
        if rejection is not None:
            self._reject(rejection, correlation=request.correlation_data)
            return
        log.info("request_queued", request_id=request.id, position=position, session=request.session)
        self._publish_state()

    def _reject(self, rejection: Rejection, correlation: bytes | None = None) -> None:
        assert self.publisher is not None
        with self._lock:
            self._errors_total += 1
        correlation = correlation if correlation is not None else rejection.correlation_data
        self.publisher.error(ErrorEvent(code=rejection.code, message=rejection.message, id=rejection.id))
        if rejection.id is not None:
            final = FinalResponse(
                id=rejection.id,
                state="error",
                text="",
                finish_reason="error",
                error=ErrorInfo(code=rejection.code, message=rejection.message),
                node=self.topics.node,
                model=self._model_name(),
            )
            self._publish_final(final, rejection.reply_topic, correlation, record_last=False)
        self._publish_state()

    # -- abort and clear ---------------------------------------------------------------------------------

    def _abort(self, request_id: str | None) -> None:
        removed: Request | None = None
        cancel: CancelToken | None = None
        with self._lock:
            current = self._current
            if current is not None and (request_id is None or current.id == request_id):
                cancel = self._current_cancel
                target = current.id
            else:
                target = None
                for queued in self._queue:
                    if queued.id == request_id:
                        removed = queued
                        break
                if removed is not None:
                    self._queue.remove(removed)
        if target is not None:
            log.info("abort_requested", request_id=target, running=True)
            if cancel is not None:
                cancel.cancel("abort")
        elif removed is not None:
            log.info("abort_requested", request_id=removed.id, running=False)
            self._finish_unrun(removed, "aborted", "aborted while queued")
        elif request_id is not None:
            assert self.publisher is not None
            self.publisher.error(
                ErrorEvent(code="invalid_request", message=f"abort: no running or queued request with id {request_id}")
            )
        else:
            log.info("abort_ignored", reason="nothing is running")

    def _clear(self, session: str | None) -> None:
        held = self.supervisor.forget(session)
        log.info("history_cleared", session=session or "(all)", held=held)

    # -- runner --------------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        while True:
            with self._work:
                while not self._queue and not self._stopping:
                    self._work.wait()
                if not self._queue:
                    return
                request = self._queue.popleft()
                self._current = request
                self._current_started = time.monotonic()
                self._current_cancel = CancelToken()
            try:
                self._run(request)
            except Exception:  # a failure here must not leave the request unanswered
                log.exception("request_failed", request_id=request.id)
                self._finish_unrun(request, "runtime_error", "internal error while running the request")
            finally:
                with self._work:
                    self._current = None
                    self._current_started = None
                    self._work.notify_all()
                self._publish_state()

    def _run(self, request: Request) -> None:
        assert self.publisher is not None
        started = time.monotonic()
        reply = self.publisher.reply_topics(request.id, request.reply_topic)
        self.publisher.status(
            reply, RequestStatus(id=request.id, status="started", position=0), request.correlation_data
        )
        self._publish_state()
        log.info("request_started", request_id=request.id, queued_ms=round((started - request.received_at) * 1000, 1))
        if self.supervisor.status in ("loading", "restarting"):
            self.supervisor.wait_settled(request.timeout_s)
        streamer = ChunkStreamer(
            request.id,
            lambda chunk: self.publisher.chunk(reply, chunk, request.correlation_data) if self.publisher else None,
            interval_ms=self.settings.limits.stream_interval_ms,
            enabled=request.stream,
            congested=self.publisher.congested,
        )
        cancel = self._current_cancel or CancelToken()
        try:
            result = self.supervisor.generate(self._generation_request(request), streamer, cancel)
        except RequestError as exc:
            result = GenerationResult("", "error", exc.code, exc.message)
        self._finish(request, result, started)

    @staticmethod
    def _generation_request(request: Request) -> GenerationRequest:
        return GenerationRequest(
            prompt=request.prompt,
            timeout_s=max(0.001, request.timeout_s),
            session=request.session,
            system=request.system,
            max_new_tokens=request.max_new_tokens,
            sampling=request.sampling,
        )

    def _finish(self, request: Request, result: GenerationResult, started: float) -> None:
        ended = time.monotonic()
        code = result.error_code
        tokens_per_s = None
        if result.completion_tokens and result.generate_ms > 0:
            tokens_per_s = round(result.completion_tokens / (result.generate_ms / 1000.0), 2)
        final = FinalResponse(
            id=request.id,
            state=_final_state(code),
            text=result.text,
            finish_reason=result.finish_reason,
            error=ErrorInfo(code=code, message=result.error_message or code) if code else None,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
            timing=Timing(
                queued_ms=round((started - request.received_at) * 1000.0, 2),
                ttft_ms=round(result.ttft_ms, 2) if result.ttft_ms is not None else None,
                generate_ms=round(result.generate_ms, 2),
                total_ms=round((ended - request.received_at) * 1000.0, 2),
                tokens_per_s=tokens_per_s,
            ),
            node=self.topics.node,
            model=self._model_name(),
            session=request.session,
        )
        if code is None:
            self._last_tokens_per_s = tokens_per_s
            self._last_ttft_ms = final.timing.ttft_ms
        elif code not in ("aborted", "timeout"):
            with self._lock:
                self._errors_total += 1
            assert self.publisher is not None
            self.publisher.error(
                ErrorEvent(code=code, message=final.error.message if final.error else code, id=request.id)
            )
            if code in RUNTIME_ERROR_CODES:
                self._last_error = final.error.message if final.error else code
                self.publisher.health(self.health_payload())
        log.info(
            "request_done",
            request_id=request.id,
            state=final.state,
            finish_reason=final.finish_reason,
            tokens=result.completion_tokens,
            ttft_ms=final.timing.ttft_ms,
            tokens_per_s=tokens_per_s,
            total_ms=final.timing.total_ms,
        )
        self._publish_final(final, request.reply_topic, request.correlation_data, record_last=True)

    def _finish_unrun(self, request: Request, code: ErrorCode, message: str) -> None:
        result = GenerationResult("", "abort" if code == "aborted" else "error", code, message)
        self._finish(request, result, time.monotonic())

    def _publish_final(
        self, final: FinalResponse, reply_topic: str | None, correlation: bytes | None, *, record_last: bool
    ) -> None:
        assert self.publisher is not None
        reply = self.publisher.reply_topics(final.id, reply_topic)
        self.publisher.final(reply, final, correlation)
        if record_last:
            self._last_final = final
            self.publisher.last(final)
        if self.settings.homeassistant.enabled:
            event = ha.ha_event_payload(final)
            self.publisher.raw(ha.ha_event_topic(self.settings), event.model_dump_json().encode(), retain=False)

    # -- retained status and discovery -------------------------------------------------------------------

    def _model_name(self) -> str | None:
        info = self.supervisor.model_info
        return info.model_name if info else None

    def _publish_state(self) -> None:
        if self.publisher is not None:
            self.publisher.state(self.state_payload())

    def _publish_all_status(self) -> None:
        assert self.publisher is not None
        self.publisher.health(self.health_payload())
        self._publish_state()
        info = self.supervisor.model_info
        if info is not None:
            self.publisher.model(info)
        if self._last_final is not None:
            self.publisher.last(self._last_final)

    def _on_runtime_changed(self) -> None:
        if self.publisher is None:
            return
        self.publisher.health(self.health_payload())
        self._publish_state()
        info = self.supervisor.model_info
        if info is not None:
            self.publisher.model(info)
            if info.model_name != self._announced_model:
                self._announce()

    def _announce(self) -> None:
        assert self.publisher is not None
        info = self.supervisor.model_info
        if self.settings.homeassistant.enabled:
            messages = ha.discovery_messages(self.settings, info)
            self._announced_model = info.model_name if info else None
        else:
            messages = ha.removal_messages(self.settings)
        for message in messages:
            self.publisher.raw(message.topic, message.payload, retain=message.retain)
        log.info("discovery_published", entities=len(messages), enabled=self.settings.homeassistant.enabled)

    def _clear_stale_configs(self) -> None:
        assert self.publisher is not None
        removals = ha.stale_config_removals(self.settings, set(self._seen_configs))
        for message in removals:
            self.publisher.raw(message.topic, message.payload, retain=message.retain)
        if removals:
            log.info("discovery_stale_removed", topics=[m.topic for m in removals])

    # -- stopping --------------------------------------------------------------------------------------

    def stop(self, grace_s: float) -> None:
        """Take no new requests, answer queued ones with ``aborted``, let the running one finish within
        ``grace_s`` (then abort it), and stop both threads."""
        with self._work:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._work.notify_all()
        for request in pending:
            self._finish_unrun(request, "aborted", "the bridge is shutting down")
        runner = self._runner
        if runner is not None:
            runner.join(grace_s)
            if runner.is_alive():
                log.info("shutdown_aborting_running", request_id=self.current_request_id)
                cancel = self._current_cancel
                if cancel is not None:
                    cancel.cancel("shutdown")
                runner.join(self.settings.limits.hang_grace_s + 5.0)
        self._put(_Stop())
        if self._dispatcher is not None:
            self._dispatcher.join(5.0)
        with contextlib.suppress(Exception):
            self._publish_state()
