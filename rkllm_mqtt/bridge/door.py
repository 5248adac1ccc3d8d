"""The MQTT front door: messages in, jobs to the scheduler, everything the contract promises out (docs/topics.md).

Threads: paho's network thread only offers messages to the dispatcher's inbox (:meth:`MqttDoor.on_message` never
waits); the dispatcher thread routes them, parses requests, submits jobs, answers rejections, runs the
extensions and publishes retained status; the scheduler's threads report each job through its
:class:`~rkllm_mqtt.bridge.reporter.MqttJobReporter` and tell the door that the state changed (``on_change``).

When the inbox is full, nothing acknowledged is dropped in silence: a prompt is answered ``queue_full`` (or with
the reason it is malformed) at once, an abort or clear is carried out at once, on paho's thread, without waiting
for anything; only messages that carry no request (a peer's state, a Home Assistant birth) are let go, counted
and logged.

Settling (docs/reliability.md): a QoS 1 prompt arrives with a :class:`~rkllm_mqtt.bridge.acks.Delivery` and is
acknowledged to the broker only once it is settled: its final response is with the broker, or it was handed to a
peer, or it carried nothing to answer. Its final is recorded in the ledger of settled ids before it goes out,
so a prompt the broker sends again after a crash (DUP set) is recognised and not answered twice; a redelivered
prompt whose request is still queued or running joins it instead of running again.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import structlog

from rkllm_mqtt import __version__
from rkllm_mqtt.bridge.acks import Delivery
from rkllm_mqtt.bridge.cluster import PeerTable
from rkllm_mqtt.bridge.dispatcher import Deadline, Dispatcher
from rkllm_mqtt.bridge.extension import Extension
from rkllm_mqtt.bridge.group_sync import GroupSync
from rkllm_mqtt.bridge.ledger import SettledLedger
from rkllm_mqtt.bridge.memory import release_free_memory
from rkllm_mqtt.bridge.outgoing import forget_checked_topics
from rkllm_mqtt.bridge.publisher import Publisher
from rkllm_mqtt.bridge.publishing import Publishing
from rkllm_mqtt.bridge.rate import EventRate
from rkllm_mqtt.bridge.reporter import MqttJobReporter
from rkllm_mqtt.bridge.requests import (
    Rejection,
    Request,
    RequestRules,
    parse_abort,
    parse_clear,
    parse_request,
    reply_topic_problem,
)
from rkllm_mqtt.bridge.retained_finals import RetainedFinals
from rkllm_mqtt.bridge.transport import IncomingMessage
from rkllm_mqtt.core.jobs import GenerationRequest, Job, Refused
from rkllm_mqtt.core.runtime_view import RuntimeView
from rkllm_mqtt.core.scheduler import RUNTIME_FAILURES, Scheduler
from rkllm_mqtt.payloads import (
    ID_PATTERN,
    BridgeStatus,
    ErrorEvent,
    ErrorInfo,
    FinalResponse,
    HealthPayload,
    HealthStatus,
    ModelInfo,
    RuntimeStatus,
    StatePayload,
)
from rkllm_mqtt.settings import Settings
from rkllm_mqtt.topics import Topics

log = structlog.get_logger(__name__)
_ID_RE = re.compile(ID_PATTERN)
_TOKEN_RE = re.compile(r"^[0-9a-f]{32}$")

# Payload bytes waiting for the dispatcher: a broker may pass messages of up to 256 MB (Mosquitto's default
# limit), so the count alone bounds nothing. Past this too, prompts are answered from paho's thread.
INBOX_BYTES = 64 * 1024 * 1024
# Messages waiting for the dispatcher; past this, prompts are answered queue_full from paho's thread. Large enough
# for a flood of 50,000 prompts to be read at once (about 20 MB while it lasts): answering on paho's thread slows
# its reading, and a request sent after the flood is read only once the flood has been.
INBOX_SIZE = 50000
# An abort by id whose prompt has not arrived yet is remembered this long (and at most this many): prompts and
# control messages come on two connections, and the broker may hold a prompt back behind its in-flight window
# while the abort sent after it arrives at once.
EARLY_ABORT_S = 60.0
EARLY_ABORT_MAX = 256
# While the inbox is full, one log line per this many messages handled on paho's thread.
_OVERFLOW_LOG_EVERY = 1000
# An inbox this deep is a flood, not traffic: the newest message is taken every other time (a request sent after
# the flood is not made to wait for all of it), and memory is given back once it has drained.
_DEEP_INBOX = 1000
# Refused requests per second past which they are answered cheaply (their final alone) and the state is not
# published per change: no client refuses itself this often by mistake; a flood does.
FAST_REFUSALS_PER_S = 50
# How often a held-back state publish looks again whether the broker has caught up.
_STATE_RETRY_S = 0.2
# How often, after a flood, the door looks whether its answers have left so that memory can be given back.
_RELEASE_RETRY_S = 1.0
_RELEASE_TRIES = 60
_HEALTH: dict[RuntimeStatus, HealthStatus] = {
    "ready": "ok",
    "failed": "error",
    "loading": "degraded",
    "restarting": "degraded",
}


class Settling(Protocol):
    """The transport that acknowledges received prompts once they are settled."""

    def settle(self, delivery: Delivery | None) -> None: ...


@dataclass(frozen=True)
class _Connected:
    pass


@dataclass(frozen=True)
class _RuntimeChanged:
    pass


@dataclass(frozen=True)
class _RefreshState:
    pass


InboxItem = IncomingMessage | _Connected | _RuntimeChanged | _RefreshState


class MqttDoor:
    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        runtime: RuntimeView,
        extensions: Sequence[Extension] = (),
        *,
        inbox_size: int = INBOX_SIZE,
        ledger: SettledLedger | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.runtime = runtime
        self.extensions = list(extensions)
        self.topics = Topics(settings.mqtt.base_topic, settings.mqtt.node_id)
        self.node = self.topics.node
        self.rules = RequestRules.from_settings(settings, self.topics.root)
        self.cluster = settings.cluster.enabled
        self.peers = PeerTable(self.topics)
        self.publisher: Publisher | None = None
        self.dispatcher: Dispatcher[InboxItem] = Dispatcher(
            self._handle, capacity=inbox_size, flood_above=_DEEP_INBOX, capacity_bytes=INBOX_BYTES
        )
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self._last_final: FinalResponse | None = None
        self._state_lock = threading.Lock()  # retained state goes out in the order its snapshots were taken
        self._overflowed = 0
        self.ledger = ledger
        # Acknowledgements wait for the ledger's sync on a thread of their own (without a ledger, for nothing).
        self._synced = GroupSync(ledger.sync) if ledger is not None else None
        self._acks: Settling | None = None
        # QoS 1 deliveries waiting for their request's final, by request id (the dispatcher adds, the runner takes).
        self._unsettled: dict[str, list[Delivery]] = {}
        self._unsettled_lock = threading.Lock()
        # Hand-off tokens of pending requests a peer passed on, by request id: recorded with the final.
        self._handoffs: dict[str, str] = {}
        self._rejected_quietly = 0  # rejections answered with the final alone, while the broker was behind
        self._refusals = EventRate(FAST_REFUSALS_PER_S)  # refusals per second: past the limit, a flood
        self._state_refresh_pending = False  # a state publish held back while the broker is behind
        self._flooded = False  # the inbox ran deep: memory is given back once it is empty again
        self._replayed = False  # unsettled finals of a previous run go out once, on the first connect
        # Aborts by id that came before their prompt (dispatcher thread only), by id: when they came (monotonic).
        self._early_aborts: dict[str, float] = {}

    # -- wiring -----------------------------------------------------------------------------------------

    def attach(self, transport: Publishing, finals: RetainedFinals | None = None, acks: Settling | None = None) -> None:
        """Publish through ``transport`` (finals retained a while through ``finals``); acknowledge settled prompts
        through ``acks`` (the prompts' connection)."""
        self.publisher = Publisher(transport, self.topics, finals)
        self._acks = acks

    def subscriptions(self) -> list[str]:
        return self.prompt_subscriptions() + self.peer_subscriptions() + self.control_subscriptions()

    def prompt_subscriptions(self) -> list[str]:
        """Topics that carry requests: acknowledged when settled, so on a connection of their own."""
        topics = [self.topics.prompt]
        if self.cluster:
            topics.append(self.topics.shared_group_prompt(self.settings.cluster.group))
        return topics

    def peer_subscriptions(self) -> list[str]:
        """The peers' state and availability (cluster mode), taken at QoS 0 on the prompts' connection: a hand-off
        decision must see a peer's state in the order it came with the group prompts, and QoS 0 messages neither
        need an acknowledgement nor wait for a place in the broker's window behind unsettled prompts."""
        return self.peers.subscriptions() if self.cluster else []

    def control_subscriptions(self) -> list[str]:
        """Abort, clear and status topics: acknowledged on receipt, never behind unsettled prompts."""
        topics = [self.topics.abort, self.topics.clear]
        for extension in self.extensions:
            topics.extend(extension.subscriptions())
        return topics

    def start(self) -> None:
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        for extension in self.extensions:
            extension.start(self)
        if self._synced is not None:
            self._synced.start()
        self.dispatcher.start()

    def stop(self) -> None:
        """Stop the dispatcher (after what it holds) and the extensions. The scheduler is stopped before."""
        self.dispatcher.stop()
        if self._synced is not None:
            self._synced.stop()  # what waits is acknowledged; a later one syncs first on the caller's thread
        for extension in self.extensions:
            extension.stop()
        self.on_change()

    # -- hand-over points for foreign threads: never block ------------------------------------------------

    def on_message(self, message: IncomingMessage) -> None:
        """paho's thread."""
        if not self.dispatcher.offer(message, len(message.payload)):
            self._overflow(message)
        elif self.dispatcher.depth > _DEEP_INBOX:
            self._flooded = True

    def on_connected(self) -> None:
        """paho's thread."""
        self.dispatcher.put(_Connected())

    def on_runtime_change(self) -> None:
        """The supervisor's thread."""
        self.dispatcher.put(_RuntimeChanged())

    def on_change(self) -> None:
        """The scheduler's observer: its snapshot changed. Any thread.

        While the broker is behind, or requests are being refused fast, the retained state is not published per
        change (a flood of rejections would add one message each): one refresh is left to the dispatcher, which
        publishes the latest state a moment later (at most ``1 / _STATE_RETRY_S`` times a second) once the broker
        has caught up."""
        if self.publisher is None:
            return
        if self.publisher.congested() or self._refusals.fast():
            with self._state_lock:
                if self._state_refresh_pending:
                    return
                self._state_refresh_pending = True
            self.dispatcher.put(_RefreshState())
            return
        with self._state_lock:
            self.publisher.state(self.state_payload())

    def _release_after_flood(self, tries: int = 0) -> None:
        """Dispatcher thread: the inbox has drained; once the answers have left too (or after a minute of
        trying), give the flood's heap back."""
        assert self.publisher is not None
        transport = self.publisher.transport
        # The QoS 0 answers count too: in a flood of QoS 0 prompts most answers are QoS 0, and released before
        # they were written, the memory they held afterwards stayed with the process.
        if (transport.backlog > 0 or transport.unsent > 0) and tries < _RELEASE_TRIES:
            self.dispatcher.call_later(_RELEASE_RETRY_S, partial(self._release_after_flood, tries + 1))
            return
        forget_checked_topics()
        release_free_memory()

    def _refresh_state(self) -> None:
        """Dispatcher thread: publish the state held back while the broker was behind, once it has caught up."""
        assert self.publisher is not None
        if self.publisher.congested():
            self.dispatcher.call_later(_STATE_RETRY_S, self._refresh_state)
            return
        with self._state_lock:
            self._state_refresh_pending = False
            self.publisher.state(self.state_payload())

    # -- what the door shows ------------------------------------------------------------------------------

    def state_payload(self) -> StatePayload:
        snap = self.scheduler.snapshot()
        runtime = self.runtime.status
        status: BridgeStatus
        if snap.current_id is not None:
            status = "busy"
        elif runtime == "failed":
            status = "error"
        elif runtime in ("loading", "restarting"):
            status = "loading"
        else:
            status = "idle"
        return StatePayload(
            status=status,
            request_id=snap.current_id,
            request_source=snap.current_source,
            queue_depth=snap.queue_depth,
            requests_total=snap.requests_total,
            errors_total=snap.errors_total,
            rejected_total=snap.rejected_total,
            tokens_per_s=snap.tokens_per_s,
            ttft_ms=snap.ttft_ms,
        )

    def health_payload(self) -> HealthPayload:
        runtime = self.runtime.status
        return HealthPayload(
            status=_HEALTH[runtime],
            runtime=runtime,
            started_at=round(self.started_at, 3),
            last_error=self.runtime.last_error if runtime != "ready" else self.scheduler.snapshot().last_error,
            restarts=self.runtime.restarts,
            version=__version__,
        )

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        state = self.state_payload()
        model = self.runtime.model_info
        runtime = f"runtime {self.runtime.status}"
        if model is not None:
            runtime += f" ({model.model_name}, abi {model.abi})"
        parts = [runtime, f"{state.status}, queue {state.queue_depth}, {state.requests_total} requests"]
        parts.append(f"up {_duration(time.monotonic() - self._started_monotonic)}")
        error = self.runtime.last_error or self.scheduler.snapshot().last_error
        if error:
            parts.append(f"last error: {error[:120]}")
        return "; ".join(parts)

    def healthy(self, now: float | None = None) -> bool:
        """For the systemd watchdog: the dispatcher and the runner are not wedged, the supervisor runs."""
        now = time.monotonic() if now is None else now
        return self.dispatcher.healthy(now) and self.scheduler.healthy(now) and self.runtime.alive()

    def model_name(self) -> str | None:
        info = self.runtime.model_info
        return info.model_name if info else None

    # -- the extension host (called by extensions on the dispatcher thread) ---------------------------------

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        assert self.publisher is not None
        self.publisher.raw(topic, payload, retain=retain)

    def call_later(self, delay_s: float, action: Callable[[], None]) -> Deadline:
        return self.dispatcher.call_later(delay_s, action)

    def model_info(self) -> ModelInfo | None:
        return self.runtime.model_info

    def republish_status(self) -> None:
        self._publish_runtime_status()
        if self._last_final is not None:
            assert self.publisher is not None
            self.publisher.last(self._last_final)

    def _publish_runtime_status(self) -> None:
        assert self.publisher is not None
        self.publisher.health(self.health_payload())
        self.on_change()
        info = self.runtime.model_info
        if info is not None:
            self.publisher.model(info)

    # -- the dispatcher thread --------------------------------------------------------------------------------

    def _handle(self, item: InboxItem) -> None:
        if isinstance(item, IncomingMessage):
            try:
                self._route(item)
            except Exception:
                # A prompt left unsettled would hold back the acknowledgement of every later one (they go out in
                # order) and, once the broker's window is full, stop the prompts altogether.
                self._settle(item.delivery)
                raise
            if self._flooded and self.dispatcher.depth == 0:
                self._flooded = False
                self._release_after_flood()
        elif isinstance(item, _RefreshState):
            self.dispatcher.call_later(_STATE_RETRY_S, self._refresh_state)  # the changes of that moment in one
        elif isinstance(item, _Connected):
            self._replay_unsettled_finals()
            self.republish_status()
            for extension in self.extensions:
                extension.on_connected()
        else:
            self._publish_runtime_status()
            for extension in self.extensions:
                extension.on_runtime_change()

    def _route(self, message: IncomingMessage) -> None:
        topic = message.topic
        if topic == self.topics.prompt:
            self._prompt(message)
        elif self.cluster and topic == self.topics.group_prompt:
            if not self._hand_off(message):
                self._prompt(message)
        else:
            self._route_control(message)
            self._settle(message.delivery)  # nothing to answer: settled once handled

    def _route_control(self, message: IncomingMessage) -> None:
        topic = message.topic
        if topic == self.topics.abort:
            if not message.retain:
                self._abort(message.payload)
        elif topic == self.topics.clear:
            if not message.retain:
                self._clear(message.payload)
        elif self.cluster and self.peers.observe(topic, message.payload):
            pass
        else:
            for extension in self.extensions:
                if extension.on_message(message):
                    return
            # Anything else (a broker may re-send unrelated retained messages to new subscriptions) is ignored.

    def _prompt(self, message: IncomingMessage) -> None:
        delivery = message.delivery
        if message.retain:
            self._reject(Rejection("invalid_request", "retained prompts are ignored: publish without retain"))
            self._settle(delivery)
            return
        parsed = self._parse(message)
        handoff = _valid_token(message.handoff)
        if (message.dup or handoff) and self._seen_before(parsed.id, delivery, dup=message.dup, handoff=handoff):
            return
        if isinstance(parsed, Rejection):
            self._reject(parsed, delivery=delivery, handoff=handoff)
        else:
            self._submit(parsed, delivery, handoff)

    def _parse(self, message: IncomingMessage) -> Request | Rejection:
        try:
            return parse_request(
                message.payload,
                rules=self.rules,
                received_at=message.received_at,
                property_reply_topic=message.response_topic,
                correlation_data=message.correlation_data,
            )
        except Exception:  # a payload the parser cannot cope with (JSON nested too deep) still gets a coded answer
            log.exception("request_unparsable", topic=message.topic, size=len(message.payload))
            return Rejection("invalid_json", "payload could not be parsed", None, None, message.correlation_data)

    def _seen_before(
        self, request_id: str | None, delivery: Delivery | None, *, dup: bool, handoff: str | None = None
    ) -> bool:
        """A prompt sent again (by the broker: DUP; by a peer: its hand-off token): True when it is answered
        already or still pending here. A fresh prompt may reuse an id: only these two are looked up."""
        answered = self.ledger is not None and (
            (handoff is not None and self.ledger.contains(_handoff_key(handoff)))
            or (dup and request_id is not None and self.ledger.contains(request_id))
        )
        if answered:
            log.info("request_redelivered", request_id=request_id, outcome="answered before")
            self._settle(delivery)
            return True
        if request_id is None or not dup:
            return False
        if delivery is not None:
            with self._unsettled_lock:
                pending = self._unsettled.get(request_id)
                if pending is not None:
                    pending.append(delivery)  # settled with the request already queued or running
            if pending is not None:
                log.info("request_redelivered", request_id=request_id, outcome="pending")
                return True
        return False

    def _settle(self, delivery: Delivery | None) -> None:
        if delivery is not None and self._acks is not None:
            self._acks.settle(delivery)

    def _take_unsettled(self, request_id: str) -> list[Delivery]:
        with self._unsettled_lock:
            return self._unsettled.pop(request_id, [])

    def _take_handoff(self, request_id: str) -> str | None:
        with self._unsettled_lock:
            return self._handoffs.pop(request_id, None)

    def _record_final(
        self,
        request_id: str,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
        *,
        response_topic: str | None = None,
        handoff: str | None = None,
    ) -> None:
        if self.ledger is None:
            return
        try:
            # Written, not synced: a killed process cannot lose it; the sync comes before the acknowledgement.
            self.ledger.record_final(
                request_id, topic, payload, correlation, durable=False, response_topic=response_topic, handoff=handoff
            )
        except (OSError, ValueError) as exc:
            log.error("ledger_write_failed", request_id=request_id, error=str(exc))

    def _record_handoff(self, token: str) -> None:
        """A peer's hand-off answered here: the same hand-off sent again (the peer crashed) is not run again."""
        if self.ledger is None:
            return
        try:
            self.ledger.settle(_handoff_key(token), durable=False)
        except (OSError, ValueError) as exc:
            log.error("ledger_write_failed", handoff=token, error=str(exc))

    def _final_acknowledged(self, request_id: str, deliveries: list[Delivery]) -> None:
        """The broker has the final (paho's thread, which only hands it on): the request is settled, and its prompts
        are acknowledged once the ledger is on disk (one sync for every final acknowledged meanwhile)."""
        if self._synced is None:
            self._settle_all(deliveries)
            return
        self._synced.after_sync(partial(self._record_settled, request_id, deliveries))

    def _record_settled(self, request_id: str, deliveries: list[Delivery]) -> None:
        """After the sync that put the final's record on disk: the settled mark (a power cut that loses it only
        makes the next start publish that final once more), then the acknowledgements."""
        assert self.ledger is not None
        try:
            self.ledger.settle(request_id, durable=False)
        except (OSError, ValueError) as exc:
            log.error("ledger_write_failed", request_id=request_id, error=str(exc))
        self._settle_all(deliveries)

    def _settle_all(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._settle(delivery)

    def _replay_unsettled_finals(self) -> None:
        """Finals recorded before a crash and not known to have reached the broker go out again, same bytes."""
        if self.ledger is None or self._replayed:
            return
        self._replayed = True
        assert self.publisher is not None
        for pending in self.ledger.unsettled_finals():
            log.info("final_published_again", request_id=pending.request_id, topic=pending.topic)
            self.publisher.transport.publish(
                pending.topic,
                pending.payload,
                qos=1,
                correlation_data=pending.correlation,
                response_topic=pending.response_topic,
                on_acked=partial(self._final_acknowledged, pending.request_id, []),
                handoff=pending.handoff,
            )

    def _submit(self, request: Request, delivery: Delivery | None = None, handoff: str | None = None) -> None:
        assert self.publisher is not None
        reporter = MqttJobReporter(request, self.publisher, self, interval_ms=self.settings.limits.stream_interval_ms)
        job = Job(
            id=request.id,
            request=GenerationRequest(
                prompt=request.prompt,
                timeout_s=max(0.001, request.timeout_s),
                session=request.session,
                system=request.system,
                max_new_tokens=request.max_new_tokens,
                sampling=request.sampling,
            ),
            reporter=reporter,
            received_at=request.received_at,
            source="mqtt",
        )
        registered = False
        if delivery is not None:
            with self._unsettled_lock:
                if request.id not in self._unsettled:  # an id in use is refused below; its holder keeps the entry
                    self._unsettled[request.id] = [delivery]
                    if handoff is not None:
                        self._handoffs[request.id] = handoff
                    registered = True
        admission = self.scheduler.submit(job)
        if not isinstance(admission, Refused) and self._take_early_abort(request.id):
            self.scheduler.abort(request.id)
        if isinstance(admission, Refused):
            if registered:
                self._take_unsettled(request.id)
                self._take_handoff(request.id)
            # A refused id that is in use belongs to the pending request: its reply topic is not answered.
            duplicate = admission.code == "invalid_request"
            rejection = Rejection(
                admission.code,
                admission.message,
                None if duplicate else request.id,
                None if duplicate else request.reply_topic,
                request.correlation_data,
            )
            self._reject(rejection, counted=True, delivery=delivery, handoff=None if duplicate else handoff)

    def _hand_off(self, message: IncomingMessage) -> bool:
        """Pass a group request this node cannot start now to an idle peer. True when it was passed on."""
        busy = self.scheduler.snapshot().busy or self.runtime.status != "ready"
        if not busy or message.retain:
            return False
        if message.response_topic is not None and reply_topic_problem(message.response_topic, self.rules) is not None:
            return False  # answered here with forbidden_topic; forwarding the property could cost the connection
        peer = self.peers.pick_idle()
        if peer is None:
            return False  # every node is busy: queue it here (or answer queue_full), nothing is lost
        assert self.publisher is not None
        target = Topics(self.topics.base, peer).prompt
        request_id = _readable_id(message.payload)
        delivery = message.delivery
        handoff = _valid_token(message.handoff)
        if (message.dup or handoff) and self._seen_before(request_id, delivery, dup=message.dup, handoff=handoff):
            return True
        # The same token each time this prompt is handed on (after a crash too): the peer answers it once.
        token = handoff or uuid.uuid4().hex
        on_acked = None
        if delivery is not None and request_id is not None:
            # Like a final: recorded before it goes out, sent again at the next start if the broker never had it.
            self._record_final(
                request_id,
                target,
                message.payload,
                message.correlation_data,
                response_topic=message.response_topic,
                handoff=token,
            )
            on_acked = partial(self._final_acknowledged, request_id, [delivery])
        elif delivery is not None:
            on_acked = partial(self._settle, delivery)
        self.publisher.forward(
            target, message.payload, message.response_topic, message.correlation_data, on_acked=on_acked, handoff=token
        )
        log.info("request_handed_off", peer=peer, topic=target, request_id=request_id)
        return True

    def _abort(self, payload: bytes) -> None:
        request_id = parse_abort(payload)
        if isinstance(request_id, Rejection):
            self._reject(request_id)
            return
        outcome = self.scheduler.abort(request_id)
        if outcome == "not_found":
            if request_id is not None:
                self._remember_early_abort(request_id)
            assert self.publisher is not None
            self.publisher.error(
                ErrorEvent(
                    code="invalid_request",
                    message=f"abort: no running or queued request with id {request_id}; "
                    f"a request with this id arriving within {EARLY_ABORT_S:g} s is aborted",
                )
            )
        elif outcome == "idle":
            log.info("abort_ignored", reason="nothing is running")

    def _remember_early_abort(self, request_id: str) -> None:
        now = time.monotonic()
        self._early_aborts = {
            rid: at for rid, at in self._early_aborts.items() if now - at < EARLY_ABORT_S and rid != request_id
        }
        self._early_aborts[request_id] = now
        while len(self._early_aborts) > EARLY_ABORT_MAX:
            del self._early_aborts[next(iter(self._early_aborts))]

    def _take_early_abort(self, request_id: str) -> bool:
        at = self._early_aborts.pop(request_id, None)
        return at is not None and time.monotonic() - at < EARLY_ABORT_S

    def _clear(self, payload: bytes) -> None:
        session = parse_clear(payload)
        if isinstance(session, Rejection):
            self._reject(session)
            return
        self.scheduler.clear(session)

    # -- answers --------------------------------------------------------------------------------------------

    def _reject(
        self,
        rejection: Rejection,
        *,
        counted: bool = False,
        delivery: Delivery | None = None,
        handoff: str | None = None,
    ) -> None:
        """Answer a request that will not run: an error event, and a final response when its id is known.

        While the broker is behind (congested), only the final goes out: the one message that must arrive."""
        assert self.publisher is not None
        if not counted:
            self.scheduler.record_rejection(rejection.code)
        fast = self._refusals.add()
        congested = self.publisher.congested() or fast
        if congested:
            self._rejected_quietly += 1
            if self._rejected_quietly % _OVERFLOW_LOG_EVERY == 1:
                log.warning("rejections_answered_final_only", code=rejection.code, so_far=self._rejected_quietly)
        else:
            self.publisher.error(ErrorEvent(code=rejection.code, message=rejection.message, id=rejection.id))
        if rejection.id is None:
            self._settle(delivery)  # nothing to answer: settled once seen
        else:
            final = FinalResponse(
                id=rejection.id,
                state="error",
                text="",
                finish_reason="error",
                error=ErrorInfo(code=rejection.code, message=rejection.message),
                node=self.node,
                model=self.model_name(),
            )
            self._publish_final(
                final,
                rejection.reply_topic,
                rejection.correlation_data,
                record_last=False,
                deliveries=[delivery] if delivery is not None else [],
                cheap=congested,
                handoff=handoff,
            )

    def publish_final(self, final: FinalResponse, reply_topic: str | None, correlation: bytes | None) -> None:
        """A job's final response (called by its reporter on the scheduler's thread)."""
        assert self.publisher is not None
        error = final.error
        if error is not None and error.code not in ("aborted", "timeout"):
            self.publisher.error(ErrorEvent(code=error.code, message=error.message, id=final.id))
            if error.code in RUNTIME_FAILURES:
                self.publisher.health(self.health_payload())
        deliveries = self._take_unsettled(final.id)
        handoff = self._take_handoff(final.id)
        self._publish_final(final, reply_topic, correlation, record_last=True, deliveries=deliveries, handoff=handoff)

    def _publish_final(
        self,
        final: FinalResponse,
        reply_topic: str | None,
        correlation: bytes | None,
        *,
        record_last: bool,
        deliveries: Sequence[Delivery] = (),
        cheap: bool = False,
        handoff: str | None = None,
    ) -> None:
        """The final response; the prompts it answers are acknowledged once the broker has it.

        ``cheap`` (a rejection while the broker is behind): only the final, not kept retained, at QoS 0 when the
        prompt came at QoS 0 (it never had a message id to wait for, and cannot run paho out of message ids
        either)."""
        assert self.publisher is not None
        reply = self.publisher.reply_topics(final.id, reply_topic)
        payload = final.to_json()
        on_acked = None
        if deliveries:
            # Recorded (synced) before it goes out: a crash from here on cannot lose it nor let it run again.
            self._record_final(final.id, reply.final, payload, correlation)
            if handoff is not None:
                self._record_handoff(handoff)
            on_acked = partial(self._final_acknowledged, final.id, list(deliveries))
        qos = 0 if cheap and not deliveries else 1
        # A cheap final is not kept retained either: in a flood the broker would otherwise hold one per prompt.
        self.publisher.final(reply, final, correlation, qos=qos, on_acked=on_acked, payload=payload, retained=not cheap)
        if record_last:
            self._last_final = final
            self.publisher.last(final)
        if cheap:
            return
        for extension in self.extensions:
            extension.on_final(final)

    # -- a full inbox: paho's thread ----------------------------------------------------------------------

    def _overflow(self, message: IncomingMessage) -> None:
        self._overflowed += 1
        topic = message.topic
        if topic == self.topics.prompt or (self.cluster and topic == self.topics.group_prompt):
            handled = "answered"
            parsed = self._parse(message)
            if isinstance(parsed, Rejection):
                self._reject(parsed, delivery=message.delivery)
            else:
                self._reject(
                    Rejection(
                        "queue_full",
                        f"the bridge's inbox is full ({self.dispatcher.capacity} messages or "
                        f"{INBOX_BYTES // (1024 * 1024)} MiB): try again later",
                        parsed.id,
                        parsed.reply_topic,
                        parsed.correlation_data,
                    ),
                    delivery=message.delivery,
                )
        elif topic in (self.topics.abort, self.topics.clear) and not message.retain:
            handled = "carried out"
            if topic == self.topics.abort:
                self._abort(message.payload)
            else:
                self._clear(message.payload)
        else:
            handled = "dropped"
        if handled != "answered":
            self._settle(message.delivery)
        if self._overflowed % _OVERFLOW_LOG_EVERY == 1:
            log.warning(
                "inbox_full",
                capacity=self.dispatcher.capacity,
                topic=topic,
                handled=handled,
                overflowed=self._overflowed,
            )


def _valid_token(token: str | None) -> str | None:
    """A hand-off token as this bridge makes them (32 hex digits); anything else from the network is ignored."""
    return token if token is not None and _TOKEN_RE.match(token) else None


def _handoff_key(token: str) -> str:
    return f"handoff:{token}"


def _readable_id(payload: bytes) -> str | None:
    """The id a JSON request names, when it is a valid one (for a hand-off, which does not parse the request)."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    request_id = data.get("id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, str) and _ID_RE.match(request_id) else None


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"
