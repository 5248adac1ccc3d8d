"""Every YAML example of docs/home-assistant.md, executed in a real Home Assistant.

``python -m bench.ha_live [--hass-venv DIR] [--ha-protocol 3.1.1|5] [--asks 50]`` from the repository root;
``--help`` lists the other options.

Starts a private Mosquitto on a free loopback port, the bridge on the simulated runtime (node ``orangepi5``, the
node id of the examples, so they run unchanged), and Home Assistant from the package index in its own venv,
configured from files: the page's ask script in scripts.yaml, its automation in automations.yaml, its
configuration settings in configuration.yaml. Actions that need devices this machine does not have (a phone,
a speaker) are swapped for one that publishes what they were given to ``harness/recorded/<action>``.
Home Assistant is driven over MQTT too: small automations of the run's own call the page's blocks when
``harness/...`` topics arrive and publish their results, so nothing needs a login.

Scenarios: the ask script N times against a runtime that answers at once and N times against one that takes a
second (with the bridge on MQTT 5, and N at once more on MQTT 3.1.1, where the bridge clears the retained
finals itself); refusals (prompt_too_long, invalid_request, queue_full) and not_ready with the runtime down,
offline with the bridge stopped; the "use it" block for an answer and a refusal; the announce automation; the
notify action; the dashboard card's entities and its markdown template; the recorder settings. At the end,
no final response may be left retained. Exits non-zero when anything failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make ``bench`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.ha_live.doc_blocks import Block, Kind, blocks, only
from bench.ha_live.hass import VERSION, HassConfig, HomeAssistant, ensure_venv, wait_until
from bench.mqttc import Client, Msg
from bench.procs import Daemon, Mosquitto, free_port

NODE = "orangepi5"
ROOT = f"rkllm/{NODE}"
RETAIN_S = 10  # limits.final_retain_s for the run: short, so the leftover check at the end need not wait long
MAX_PROMPT_BYTES = 2000
FAST = "sim:rate=0,prefill_ms=0,tokens=48"
SLOW = "sim:rate=0,prefill_ms=1000,tokens=48"
DOWN = "sim:fail_init=1"
# Actions of the examples that run for real; any other one is swapped for a recorded one.
REAL_ACTIONS = {"script.ask_llm", "mqtt.publish", "notify.send_message"}
ASK_TIMEOUT_S = 60.0  # per call, far below the script's own 5 minutes: a missed answer shows as a miss


# -- the examples, made runnable ---------------------------------------------------------------------------------


def recorded(node: Any) -> Any:
    """``node`` with every action outside REAL_ACTIONS replaced by one that publishes its target and data."""
    if isinstance(node, list):
        return [recorded(item) for item in node]
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("action"), str) and node["action"] not in REAL_ACTIONS:
        name = node["action"]
        given = {"target": node.get("target"), "data": node.get("data", {})}
        return {
            "sequence": [
                {"variables": {"recorded": given}},
                {
                    "action": "mqtt.publish",
                    "data": {"topic": f"harness/recorded/{name}", "payload": "{{ recorded | to_json }}"},
                },
            ]
        }
    return {key: recorded(value) for key, value in node.items()}


def markdown_contents(card: Any) -> list[str]:
    found: list[str] = []
    if isinstance(card, dict):
        if card.get("type") == "markdown":
            found.append(str(card["content"]))
        for value in card.values():
            found.extend(markdown_contents(value))
    elif isinstance(card, list):
        for item in card:
            found.extend(markdown_contents(item))
    return found


def card_entities(card: Any) -> list[str]:
    found: list[str] = []
    if isinstance(card, dict):
        entity = card.get("entity")
        if isinstance(entity, str):
            found.append(entity)
        for value in card.values():
            found.extend(card_entities(value))
    elif isinstance(card, list):
        for item in card:
            found.extend(card_entities(item))
    return found


def harness_automations(use: Block, action: Block, card: Block) -> list[dict[str, Any]]:
    """The run's own automations: they call the page's blocks on harness/... topics and publish what came back."""
    markdown = markdown_contents(card.data)
    return [
        {
            "id": "harness_ask",
            "alias": "harness: ask",
            "mode": "parallel",
            "max": 200,
            "triggers": [{"trigger": "mqtt", "topic": "harness/ask/+"}],
            "actions": [
                {
                    "action": "script.ask_llm",
                    "data": {"question": "{{ trigger.payload_json.question }}"},
                    "response_variable": "answer",
                },
                {
                    "action": "mqtt.publish",
                    "data": {
                        "topic": "harness/answer/{{ trigger.topic.split('/')[-1] }}",
                        "payload": "{{ answer | to_json }}",
                    },
                },
            ],
        },
        {
            "id": "harness_use",
            "alias": "harness: the page's use of the ask script",
            "mode": "queued",
            "triggers": [{"trigger": "mqtt", "topic": "harness/run/use"}],
            "actions": [*recorded(copy.deepcopy(use.data)), _done("use")],
        },
        {
            "id": "harness_action",
            "alias": "harness: the page's single action",
            "mode": "queued",
            "triggers": [{"trigger": "mqtt", "topic": "harness/run/action"}],
            "actions": [recorded(copy.deepcopy(action.data)), _done("action")],
        },
        {
            "id": "harness_probe",
            "alias": "harness: what Home Assistant shows",
            "mode": "queued",
            "triggers": [{"trigger": "mqtt", "topic": "harness/probe"}],
            "actions": [
                {"variables": {"markdown": markdown}},
                {
                    "action": "mqtt.publish",
                    "data": {
                        "topic": "harness/probed",
                        "payload": "{{ {'n': trigger.payload, 'entities': states | map(attribute='entity_id') | list,"
                        " 'status': states('sensor.rkllm_" + NODE + "_status'), 'markdown': markdown} | to_json }}",
                    },
                },
            ],
        },
    ]


def _done(name: str) -> dict[str, Any]:
    return {"action": "mqtt.publish", "data": {"topic": f"harness/done/{name}", "payload": "{{ now().isoformat() }}"}}


def hass_config(found: list[Block], mqtt_port: int, protocol: str) -> HassConfig:
    script = only(found, Kind.ASK_SCRIPT)
    automation = dict(recorded(copy.deepcopy(only(found, Kind.AUTOMATION).data)))
    automation.setdefault("id", "announce_llm_answers")
    configuration: dict[str, Any] = {}
    for block in found:
        if block.kind is Kind.CONFIGURATION:
            configuration.update(block.data)
    automations = [
        automation,
        *harness_automations(only(found, Kind.ASK_USE), only(found, Kind.ACTION), only(found, Kind.CARD)),
    ]
    return HassConfig(mqtt_port, free_port(), protocol, configuration, dict(script.data), automations)


# -- the bridge -----------------------------------------------------------------------------------------------------


class Bridge(Daemon):
    """The daemon as the page's user runs it: node orangepi5, discovery on."""

    def __init__(self, workdir: Path, port: int, *, model: str, protocol: str, limits: dict[str, Any]) -> None:
        super().__init__(workdir, port, model=model, limits=limits, label="ha")
        self.node = NODE
        self.protocol = protocol
        self.config_path = workdir / f"bridge-{uuid.uuid4().hex[:6]}.toml"
        self.log_path = self.config_path.with_suffix(".log")

    def config(self) -> dict[str, dict[str, Any]]:
        config = super().config()
        config["mqtt"]["protocol"] = self.protocol
        config["homeassistant"] = {"enabled": True}
        return config


# -- results ----------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'  ' + detail if detail else ''}", flush=True)
        return ok

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def _ms(seconds: list[float]) -> str:
    if not seconds:
        return "no calls"
    ordered = sorted(seconds)
    return (
        f"median {statistics.median(ordered) * 1000:.0f} ms, max {ordered[-1] * 1000:.0f} ms over {len(ordered)} calls"
    )


# -- driving Home Assistant --------------------------------------------------------------------------------------------


class Driver:
    def __init__(self, client: Client, ask_timeout: float) -> None:
        self.client = client
        self.ask_timeout = ask_timeout
        self.asked = 0

    def probe(self, timeout: float = 10.0) -> dict[str, Any]:
        token = uuid.uuid4().hex[:8]
        after = time.monotonic_ns()
        self.client.publish("harness/probe", token)
        msg = self.client.wait_for(
            "harness/probed", lambda m: m.json().get("n") == token, timeout=timeout, after_ns=after
        )
        data: dict[str, Any] = msg.json()
        return data

    def wait_probe(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen = self.probe(timeout=5.0)
                if predicate(seen):
                    return seen
            except TimeoutError:
                seen = {}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:g} s (last seen: {str(seen)[:300]})")
            time.sleep(0.5)

    def ask(self, question: str) -> tuple[dict[str, Any] | None, float]:
        """Call the page's ask script (through an automation, with response_variable) and wait for its response."""
        self.asked += 1
        n = f"{self.asked}-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        self.send_ask(n, question)
        try:
            msg = self.client.wait_for(f"harness/answer/{n}", timeout=self.ask_timeout)
        except TimeoutError:
            return None, time.monotonic() - started
        answer: dict[str, Any] = msg.json()
        return answer, time.monotonic() - started

    def send_ask(self, n: str, question: str) -> None:
        self.client.publish(f"harness/ask/{n}", json.dumps({"question": question}))

    def run(self, name: str, timeout: float = 60.0) -> None:
        after = time.monotonic_ns()
        self.client.publish(f"harness/run/{name}", "go")
        self.client.wait_for(f"harness/done/{name}", timeout=timeout, after_ns=after)

    def recorded(self, action: str) -> list[dict[str, Any]]:
        return [m.json() for m in self.client.messages(f"harness/recorded/{action}")]


def ask_many(driver: Driver, report: Report, label: str, count: int, expect_text: Callable[[str], bool]) -> None:
    answered: list[float] = []
    problems: list[str] = []
    for i in range(count):
        question = f"{label} question {i}"
        answer, took = driver.ask(question)
        if answer is None:
            problems.append(f"#{i}: no response from the script within {driver.ask_timeout:g} s")
        elif (
            answer.get("state") != "done"
            or not expect_text(str(answer.get("text")))
            or question not in str(answer.get("text"))
        ):
            problems.append(f"#{i}: {json.dumps(answer)[:200]}")
        else:
            answered.append(took)
    report.add(
        f"ask script, {label}: {len(answered)}/{count} answered",
        len(answered) == count,
        _ms(answered) + (f"; first problems: {problems[:3]}" if problems else ""),
    )


def expect_refusal(driver: Driver, report: Report, name: str, question: str, code: str) -> None:
    answer, took = driver.ask(question)
    ok = answer is not None and answer.get("state") == "error" and (answer.get("error") or {}).get("code") == code
    report.add(
        f"{name} comes back as state error, code {code}", ok, f"{took * 1000:.0f} ms; {json.dumps(answer)[:200]}"
    )


@contextmanager
def bridge_running(
    stack_dir: Path, port: int, driver: Driver, *, model: str, protocol: str, limits: dict[str, Any]
) -> Iterator[Bridge]:
    bridge = Bridge(stack_dir, port, model=model, protocol=protocol, limits=limits)
    with bridge:
        # Home Assistant shows the node once the bridge's retained state and availability have reached it.
        driver.wait_probe(
            lambda seen: seen.get("status") not in (None, "unavailable", "unknown"),
            120.0,
            "the bridge's status in Home Assistant",
        )
        yield bridge
    # The next bridge must not be mistaken for this one: wait until Home Assistant has seen it go.
    driver.wait_probe(lambda seen: seen.get("status") == "unavailable", 60.0, "the status sensor going unavailable")


def retained_finals(port: int) -> list[Msg]:
    """Final responses the broker still holds retained: a fresh client's subscription gets them, before a sentinel."""
    client = Client(port, "leftovers").start()
    sentinel = f"harness/sentinel/{uuid.uuid4().hex[:8]}"
    try:
        client.publish(sentinel, "here", retain=True).wait_for_publish(10)
        client.subscribe(f"{ROOT}/response/+")
        client.subscribe(sentinel)
        client.wait_for(sentinel, timeout=10)
        return [
            m for t in client.topics() if t.startswith(f"{ROOT}/response/") for m in client.messages(t) if m.payload
        ]
    finally:
        client.publish(sentinel, b"", retain=True).wait_for_publish(10)
        client.stop()


# -- the run ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    asks: int
    retain_s: int
    ask_timeout: float


def scenarios(
    workdir: Path, broker: Mosquitto, hass: HomeAssistant, *, found: list[Block], options: Options, report: Report
) -> None:
    client = Client(broker.port, "harness").start()
    client.subscribe("harness/#", f"{ROOT}/response/+", f"{ROOT}/state", "homeassistant/status")
    driver = Driver(client, options.ask_timeout)
    asks = options.asks
    limits = {"final_retain_s": options.retain_s, "max_prompt_bytes": MAX_PROMPT_BYTES, "queue_size": 8}
    try:
        wait_until(
            lambda: bool(client.messages("homeassistant/status")) or not hass.alive(),
            600,
            "Home Assistant's birth message",
        )
        if not hass.alive():
            raise RuntimeError(f"Home Assistant exited; see {hass.log_path}")
        driver.wait_probe(lambda seen: True, 120.0, "Home Assistant's automations")
        print("Home Assistant is up", flush=True)

        # -- MQTT 5 bridge, a runtime that answers at once --
        with bridge_running(workdir, broker.port, driver, model=FAST, protocol="5", limits=limits):
            ask_many(
                driver, report, "runtime answering at once, bridge on MQTT 5", asks, lambda text: "You said" in text
            )
            expect_refusal(
                driver,
                report,
                "a question over limits.max_prompt_bytes",
                "x" * (MAX_PROMPT_BYTES + 100),
                "prompt_too_long",
            )
            expect_refusal(driver, report, "an empty question", "", "invalid_request")
            use_block(driver, report, expect_title="Local LLM", expect_message=lambda m: "umbrella" in m)
            announce(driver, report, found)
            notify_action(driver, client, report, found)
            dashboard(driver, report, found)
            held = retained_finals(broker.port)
            report.add(
                "finals are held retained for a late subscriber (MQTT 5 expiry)", bool(held), f"{len(held)} held"
            )

        # -- MQTT 3.1.1 bridge: the bridge clears its retained finals --
        with bridge_running(workdir, broker.port, driver, model=FAST, protocol="3.1.1", limits=limits):
            ask_many(
                driver, report, "runtime answering at once, bridge on MQTT 3.1.1", asks, lambda text: "You said" in text
            )
            expect_refusal(
                driver,
                report,
                "a question over limits.max_prompt_bytes (3.1.1)",
                "y" * (MAX_PROMPT_BYTES + 1),
                "prompt_too_long",
            )

        # -- a runtime that takes a second, and a full queue --
        with bridge_running(workdir, broker.port, driver, model=SLOW, protocol="5", limits={**limits, "queue_size": 1}):
            ask_many(driver, report, "runtime taking a second", asks, lambda text: "You said" in text)
            queue_full(driver, report)

        # -- the runtime down --
        with bridge_running(workdir, broker.port, driver, model=DOWN, protocol="5", limits=limits):
            driver.wait_probe(lambda seen: seen.get("status") == "error", 60.0, "the status sensor showing error")
            expect_refusal(driver, report, "a question while the runtime is down", "anyone there?", "not_ready")
            use_block(
                driver,
                report,
                expect_title="The local LLM did not answer",
                expect_message=lambda m: m.startswith("not_ready:"),
            )

        # -- the bridge stopped --
        expect_refusal(driver, report, "a question while the bridge is offline", "hello?", "offline")

        # -- nothing left behind --
        time.sleep(options.retain_s + 1)  # the last MQTT 5 finals expire final_retain_s after they were published
        left = retained_finals(broker.port)
        report.add(
            f"no final left retained {options.retain_s + 1} s after the last one",
            not left,
            f"{[m.topic for m in left][:5]}",
        )
    finally:
        client.stop()


def use_block(driver: Driver, report: Report, *, expect_title: str, expect_message: Callable[[str], bool]) -> None:
    action = "notify.mobile_app_my_phone"
    before = len(driver.recorded(action))
    driver.run("use")
    got = driver.recorded(action)[before:]
    data = got[0]["data"] if got else {}
    ok = len(got) == 1 and data.get("title") == expect_title and expect_message(str(data.get("message")))
    report.add(f"the page's use of the script sends '{expect_title}'", ok, json.dumps(got)[:200])


def announce(driver: Driver, report: Report, found: list[Block]) -> None:
    speak = only(found, Kind.AUTOMATION).data["actions"][0]
    action = speak["action"]
    wait_until(lambda: bool(driver.recorded(action)), 30, "the announce automation's first announcement")
    before = len(driver.recorded(action))
    first, _ = driver.ask("announce me")
    refused, _ = driver.ask("z" * (MAX_PROMPT_BYTES + 1))
    second, _ = driver.ask("announce me too")
    # Home Assistant strips what a template renders, so the recorded message is the answer without its end blanks.
    texts = [str(a.get("text")).strip() for a in (first, second) if a]
    # mode: queued keeps the order: once the second answer is announced, an announcement of the refusal would be in.
    wait_until(
        lambda: any(r["data"].get("message") == texts[-1] for r in driver.recorded(action)[before:]),
        30,
        "the announcement",
    )
    # Only what this step caused counts: an answer of the step before may still be announced after ``before``.
    spoken = [r["data"].get("message") for r in driver.recorded(action)[before:]]
    spoken = [m for m in spoken if m in texts or m in ("", None)]  # a refusal's event carries no text
    ok = refused is not None and refused.get("state") == "error" and spoken == texts and len(texts) == 2
    report.add("the announce automation speaks each answer once and no refusal", ok, f"{spoken}")
    last = driver.recorded(action)[-1]
    player = speak["data"]["media_player_entity_id"]
    report.add(
        "the announcement goes to the page's speaker",
        last["data"].get("media_player_entity_id") == player and last["target"] == speak["target"],
        json.dumps(last)[:200],
    )


def notify_action(driver: Driver, client: Client, report: Report, found: list[Block]) -> None:
    after = time.monotonic_ns()
    driver.run("action")
    message = str(only(found, Kind.ACTION).data["data"]["message"]).strip()

    def answered(msg: Msg) -> bool:
        try:
            return message in str(msg.json().get("text"))
        except ValueError:
            return False

    deadline = time.monotonic() + 30
    final: Msg | None = None
    while final is None and time.monotonic() < deadline:
        for topic in client.topics():
            if topic.startswith(f"{ROOT}/response/") and topic.count("/") == 3:
                final = next((m for m in client.messages(topic) if m.at_ns >= after and answered(m)), final)
        time.sleep(0.1)
    report.add(
        "notify.send_message on the notify entity asks the bridge", final is not None, final.topic if final else ""
    )


def dashboard(driver: Driver, report: Report, found: list[Block]) -> None:
    card = only(found, Kind.CARD).data
    wanted = card_entities(card)
    last, _ = driver.ask("what will the card show?")
    expected = str((last or {}).get("text")).strip()  # a rendered template loses its end blanks
    try:
        seen = driver.wait_probe(lambda s: s.get("markdown") == [expected], 30.0, "the markdown card")
        shown = True
    except TimeoutError as exc:
        seen, shown = driver.probe(), False
        expected = str(exc)
    missing = [e for e in wanted if e not in seen["entities"]]
    report.add(
        "every entity of the dashboard card exists", bool(wanted) and not missing, f"{len(wanted)}; missing {missing}"
    )
    report.add("the card's markdown template renders the last answer", shown, expected[:120])


def queue_full(driver: Driver, report: Report) -> None:
    # queue_size 1 and a runtime that takes a second: one call runs, one waits, the third is refused at once.
    client = driver.client
    names = [f"q{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]

    def state_shows(busy: bool, depth: int) -> Callable[[Msg], bool]:
        def match(msg: Msg) -> bool:
            state = msg.json()
            return bool(state.get("request_id")) == busy and state.get("queue_depth") == depth

        return match

    after = time.monotonic_ns()
    driver.send_ask(names[0], "first of three")
    client.wait_for(f"{ROOT}/state", state_shows(True, 0), timeout=30, after_ns=after)
    after = time.monotonic_ns()
    driver.send_ask(names[1], "second of three")
    client.wait_for(f"{ROOT}/state", state_shows(True, 1), timeout=30, after_ns=after)
    started = time.monotonic()
    driver.send_ask(names[2], "third of three")
    third = client.wait_for(f"harness/answer/{names[2]}", timeout=driver.ask_timeout).json()
    refused_ms = (time.monotonic() - started) * 1000
    answers = [client.wait_for(f"harness/answer/{n}", timeout=driver.ask_timeout).json() for n in names[:2]]
    states = [a["state"] + ("/" + a["error"]["code"] if a.get("error") else "") for a in [*answers, third]]
    report.add(
        "three calls with queue_size 1: two answers, the third refused with queue_full",
        states == ["done", "done", "error/queue_full"],
        f"{states}; the refusal in {refused_ms:.0f} ms",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ha_live", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hass-venv", type=Path, default=Path.home() / ".cache" / "rkllm-mqtt" / f"homeassistant-{VERSION}"
    )
    parser.add_argument("--python", help="Python 3.13 for a new Home Assistant venv")
    parser.add_argument("--ha-protocol", choices=("3.1.1", "5"), default="3.1.1", help="Home Assistant's MQTT protocol")
    parser.add_argument("--asks", type=int, default=50, help="calls of the ask script per runtime")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configuration)")
    parser.add_argument(
        "--final-retain-s",
        type=int,
        default=RETAIN_S,
        help="the bridge's limits.final_retain_s; 0 shows what Home Assistant misses without retained finals",
    )
    parser.add_argument("--ask-timeout", type=float, default=ASK_TIMEOUT_S, help="how long one call may take (s)")
    args = parser.parse_args(argv)

    found = blocks()
    hass_bin = ensure_venv(args.hass_venv, args.python)
    report = Report()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="rkllm-ha-live-"))
    print(f"work directory {workdir}; Home Assistant {VERSION}, its MQTT protocol {args.ha_protocol}", flush=True)
    try:
        with ExitStack() as stack:
            broker = stack.enter_context(Mosquitto(workdir))
            config = hass_config(found, broker.port, args.ha_protocol)
            config.write(workdir / "hass")
            hass = stack.enter_context(HomeAssistant(hass_bin, workdir / "hass"))
            try:
                options = Options(args.asks, args.final_retain_s, args.ask_timeout)
                scenarios(workdir, broker, hass, found=found, options=options, report=report)
            except Exception as exc:  # a scenario that could not finish is a failure, with the reason shown
                report.add("the run finished", False, f"{type(exc).__name__}: {exc}")
            database = workdir / "hass" / "home-assistant_v2.db"
            report.add("the recorder runs with the page's settings", database.exists())
            problems = hass.log_problems()
            report.add("Home Assistant logged no error", not problems, "\n".join(problems[:10]))
    finally:
        print(f"ran {time.monotonic() - started:.0f} s", flush=True)
        if not args.keep and not report.failed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", flush=True)
    passed = len(report.checks) - len(report.failed)
    print(f"{passed} passed, {len(report.failed)} failed", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
