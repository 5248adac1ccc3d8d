"""``rkllm-mqtt serve``: wires the broker, the runtime, the scheduler, the front doors and their extensions.

Start order: the runtime supervisor object, the scheduler on it, each front door on the scheduler (the MQTT door
with its transport and extensions), then the threads: scheduler, doors, transport, and the supervisor last, so
that its first status change is published. Stop order is the reverse of what depends on what: the scheduler
first (queued requests answered, the running one given its grace), then the doors, the transport, the runtime.
A new front door is built in ``start`` beside the MQTT one, on the same scheduler, and stopped in ``stop``.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from rkllm_mqtt import __version__, exit_codes
from rkllm_mqtt.bridge.door import MqttDoor
from rkllm_mqtt.bridge.ledger import SettledLedger, ledger_path, resolve_state_dir
from rkllm_mqtt.bridge.retained_finals import RetainedFinals
from rkllm_mqtt.bridge.transport import MqttTransport, Subscription
from rkllm_mqtt.broker import BrokerStartError, EmbeddedBroker
from rkllm_mqtt.core.scheduler import Scheduler
from rkllm_mqtt.ha.extension import home_assistant_extension
from rkllm_mqtt.logs import report_dropped_lines
from rkllm_mqtt.runtime.supervisor import RuntimeSupervisor
from rkllm_mqtt.sdnotify import SystemdNotifier
from rkllm_mqtt.settings import Settings

if TYPE_CHECKING:
    # aiohttp and jsonschema cost the daemon about 14 MB: loaded only when the API is on.
    from rkllm_mqtt.api.server import ApiServer

log = structlog.get_logger("rkllm_mqtt.daemon")

EMBEDDED_HOST = "127.0.0.1"
EXIT_BROKER = exit_codes.EMBEDDED_BROKER_FAILED
EXIT_API = exit_codes.API_FAILED
CONTROL_CLIENT_SUFFIX = "-ctl"
STATUS_INTERVAL_S = 30.0
# Below the unit's TimeoutStartSec (120 s).
READY_AT_LATEST_S = 90.0


def prompts_acknowledged_when_settled(settings: Settings) -> bool:
    """Whether a QoS 1 prompt is acknowledged only once it is settled (docs/reliability.md), or on receipt.

    Holding the acknowledgement keeps a prompt the broker's until the daemon has answered it, so that a broker that
    outlives the daemon sends it again. The embedded broker does not outlive it: it runs in the daemon's process and
    keeps nothing on disk. There, holding acknowledgements protects nothing, and amqtt gives up on one after 5 s
    with a warning and an error with a traceback each: a burst of 5,000 prompts logged 8,700 lines."""
    return not settings.embedded_broker


class Daemon:
    def __init__(self, settings: Settings, notifier: SystemdNotifier) -> None:
        self.settings = settings
        self.notifier = notifier
        self.stop_requested = threading.Event()
        self.broker: EmbeddedBroker | None = None
        self.supervisor: RuntimeSupervisor | None = None
        self.scheduler: Scheduler | None = None
        self.door: MqttDoor | None = None
        self.transport: MqttTransport | None = None
        # Abort, clear and status topics, acknowledged on receipt: never behind the prompts' unsettled messages.
        self.control: MqttTransport | None = None
        self.ledger: SettledLedger | None = None
        self.finals: RetainedFinals | None = None
        self.api: ApiServer | None = None

    def _announce_defaults(self) -> None:
        if self.settings.embedded_broker:
            log.warning(
                "embedded_defaults",
                broker=f"embedded amqtt on {EMBEDDED_HOST}:{self.settings.mqtt.port} (MQTT 3.1.1 only)",
                runtime=self.settings.runtime.resolved_library(),
                hint="running on the embedded defaults for a first try; set mqtt.host to use your broker "
                "(Mosquitto, Home Assistant's add-on) and runtime.model_path for a real model",
            )
        if self.settings.discovery_defaulted_off:
            log.info(
                "homeassistant_discovery_off",
                reason="the embedded broker listens on 127.0.0.1 only: Home Assistant cannot reach it",
                hint="set mqtt.host to the broker Home Assistant uses; homeassistant.enabled = true forces discovery",
            )
        if self.settings.runtime.is_simulated:
            log.warning(
                "simulated_runtime",
                hint="answers come from the bundled simulated runtime, not an LLM; set runtime.model_path",
            )

    def start(self) -> int:
        s = self.settings
        log.info(
            "starting",
            version=__version__,
            node=s.mqtt.node_id,
            base_topic=s.mqtt.base_topic,
            config=str(s.source_file) if s.source_file else None,
            allocator=os.environ.get("PYTHONMALLOC", "pymalloc"),  # rkllm_mqtt.allocator
        )
        self._announce_defaults()
        host = s.mqtt.host
        if host is None:
            self.broker = EmbeddedBroker(EMBEDDED_HOST, s.mqtt.port)
            try:
                self.broker.start()
            except BrokerStartError as exc:
                log.error("embedded_broker_failed", error=str(exc))
                return EXIT_BROKER
            host = EMBEDDED_HOST
        self.notifier.open()
        self.supervisor = RuntimeSupervisor(s, on_change=self._runtime_changed)
        runtime = self.supervisor
        self.scheduler = Scheduler(runtime, queue_size=s.limits.queue_size, hang_grace_s=s.limits.hang_grace_s)
        acknowledge_when_settled = prompts_acknowledged_when_settled(s)
        # The record serves only prompts acknowledged when settled: without them nothing is ever written to it.
        self.ledger = self._open_ledger() if acknowledge_when_settled else None
        self.door = MqttDoor(s, self.scheduler, runtime, extensions=[home_assistant_extension(s)], ledger=self.ledger)
        self.scheduler.observe(self.door)
        # amqtt speaks 3.1.1 only and never answers an MQTT 5 CONNECT with a Will.
        protocol = "3.1.1" if s.embedded_broker else None
        self.transport = MqttTransport(
            s.mqtt,
            host=host,
            availability_topic=self.door.topics.availability,
            subscriptions=[Subscription(topic) for topic in self.door.prompt_subscriptions()]
            + [Subscription(topic, qos=0) for topic in self.door.peer_subscriptions()],
            on_message=self.door.on_message,
            on_connected=self.door.on_connected,
            force_protocol=protocol,
            manual_ack=acknowledge_when_settled,
        )
        self.control = MqttTransport(
            s.mqtt,
            host=host,
            availability_topic=None,
            subscriptions=[Subscription(topic) for topic in self.door.control_subscriptions()],
            on_message=self.door.on_message,
            on_connected=lambda: None,
            force_protocol=protocol,
            client_id_suffix=CONTROL_CLIENT_SUFFIX,
        )
        if s.api.enabled:
            # The HTTP front door (Ollama's API) on the same scheduler: one queue for the one NPU.
            from rkllm_mqtt.api.server import ApiServer, ApiStartError

            self.api = ApiServer(s, self.scheduler, runtime)
            try:
                self.api.start()
            except ApiStartError as exc:
                log.error("api_start_failed", error=str(exc), hint="free the port or set api.port")
                self.api = None
                if self.broker is not None:
                    self.broker.stop()
                self.notifier.close()
                return EXIT_API
        self.finals = RetainedFinals(self.transport, s.limits.final_retain_s)
        self.finals.start()
        self.door.attach(self.transport, self.finals, acks=self.transport)
        self.scheduler.start()
        self.door.start()
        # The transports first: the supervisor's first status change is then published, not refused.
        self.control.start()
        self.transport.start()
        self.supervisor.start()
        return 0

    def _open_ledger(self) -> SettledLedger | None:
        """The record of answered request ids; without a writable state directory the daemon runs without it."""
        state_dir = resolve_state_dir(self.settings.daemon.state_dir)
        ledger = SettledLedger(ledger_path(state_dir, self.settings.mqtt.node_id))
        try:
            ledger.open()
        except OSError as exc:
            log.error(
                "ledger_unavailable",
                state_dir=str(state_dir),
                error=str(exc),
                hint="set daemon.state_dir to a writable directory; until then a prompt the broker sends again "
                "after a crash may be answered twice",
            )
            return None
        return ledger

    def _runtime_changed(self) -> None:
        if self.door is not None:
            self.door.on_runtime_change()

    def status_text(self) -> str:
        """The line ``systemctl status`` shows."""
        assert self.door is not None and self.transport is not None
        where = f"{self.transport.host}:{self.settings.mqtt.port}"
        link = f"connected to {where}" if self.transport.connected else f"connecting to {where}"
        return f"{link}; {self.door.status_line()}"

    def run(self) -> None:
        """Serve until a stop is requested, telling systemd how things are going."""
        assert self.door is not None and self.transport is not None and self.supervisor is not None
        ready_sent = False
        last_status = ""
        started = time.monotonic()
        interval = self.notifier.watchdog_interval()
        next_status = 0.0
        while not self.stop_requested.wait(1.0 if not ready_sent else (interval or STATUS_INTERVAL_S)):
            now = time.monotonic()
            if not ready_sent:
                settled = self.supervisor.status in ("ready", "failed")
                if (self.transport.connected and settled) or now - started >= READY_AT_LATEST_S:
                    # Ready once connected with the runtime loaded (or failed: the daemon stays up, says why and
                    # retries). A broker still unreachable after READY_AT_LATEST_S is retried in the background;
                    # reporting ready then keeps systemd's start timeout from killing a daemon that is working.
                    self.notifier.ready(self.status_text())
                    ready_sent = True
                    log.info("ready", runtime=self.supervisor.status, connected=self.transport.connected)
            if interval and self.door.healthy(now):
                self.notifier.watchdog()
            report_dropped_lines()  # log lines dropped in a flood are counted, at the latest on this tick
            line = self.status_text()
            if line != last_status or now >= next_status:
                self.notifier.status(line)
                last_status, next_status = line, now + STATUS_INTERVAL_S

    def stop(self) -> None:
        log.info("stopping", grace_s=self.settings.limits.shutdown_grace_s)
        self.notifier.stopping("stopping: finishing the running request")
        if self.scheduler is not None:
            self.scheduler.shutdown(self.settings.limits.shutdown_grace_s)
        if self.api is not None:
            self.api.stop()
        if self.door is not None:
            self.door.stop()
        if self.finals is not None:
            self.finals.stop()  # before the transport: the clears go out ahead of "offline"
        if self.transport is not None:
            self.transport.stop()
        if self.control is not None:
            self.control.stop()
        if self.ledger is not None:
            self.ledger.close()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.broker is not None:
            self.broker.stop()
        self.notifier.close()
        log.info("stopped")


def serve(settings: Settings) -> int:
    # Read (and remove) NOTIFY_SOCKET before any child process exists: only the daemon talks to systemd.
    notifier = SystemdNotifier.from_env()
    # A watchdog kill (SIGABRT) or a fatal error then leaves every thread's traceback in the journal.
    faulthandler.enable()
    daemon = Daemon(settings, notifier)

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        daemon.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    code = daemon.start()
    if code != 0:
        return code
    try:
        daemon.run()
    finally:
        daemon.stop()
    return 0
