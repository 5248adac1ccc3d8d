"""The HTTP layer of the Ollama API with the official ``ollama`` client, on the real scheduler and a fake runtime.

The runtime is a small fake of the scheduler's RuntimeRunner interface, scripted per test (what it answers,
whether a run waits for the test); everything else (aiohttp server, routes, scheduler) is the real code.
End-to-end tests against a daemon on the simulated runtime are in test_api_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import ollama
import pytest
import structlog

from rkllm_mqtt.api.server import ApiServer, ApiStartError
from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.core.runtime_view import StreamSink
from rkllm_mqtt.core.scheduler import Scheduler
from rkllm_mqtt.payloads import ModelInfo, RuntimeStatus
from rkllm_mqtt.settings import Settings

from .helpers import free_port

WAIT_S = 30.0
MODEL = "qwen2.5-1.5b-instruct-w8a8"


def model_info(abi: str = "1.3") -> ModelInfo:
    return ModelInfo(
        model_path="/models/qwen2.5-1.5b-instruct-w8a8.rkllm",
        model_name=MODEL,
        abi=abi,
        library="librkllmrt.so",
        max_context_len=4096,
        max_new_tokens=512,
        top_k=1,
        top_p=0.9,
        temperature=0.8,
        repeat_penalty=1.1,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        load_time_ms=10.0,
        loaded_at=1.7e9,
    )


@dataclass
class FakeRuntime:
    """Answers every run with ``reply`` cut into ``pieces``; with ``gated`` a run waits for ``release``."""

    reply: str = "The kitchen light is on."
    pieces: int = 4
    gated: bool = False
    abi: str | None = "1.3"
    requests: list[GenerationRequest] = field(default_factory=list)
    cancels: list[CancelToken] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    status: RuntimeStatus = "ready"
    last_error: str | None = None

    @property
    def model_info(self) -> ModelInfo | None:
        return model_info(self.abi or "1.3")

    def generate(self, request: GenerationRequest, sink: StreamSink, cancel: CancelToken) -> GenerationResult:
        self.requests.append(request)
        self.cancels.append(cancel)
        wake = threading.Event()
        unregister = cancel.on_cancel(wake.set)
        try:
            size = max(1, len(self.reply) // self.pieces)
            chunks = [self.reply[i : i + size] for i in range(0, len(self.reply), size)]
            sink.text(chunks[0])
            self.started.set()
            if self.gated:
                while not (self.release.is_set() or cancel.cancelled):
                    wake.wait(0.05)
            if cancel.cancelled:
                return GenerationResult(chunks[0], "abort", "aborted", "aborted on request", completion_tokens=1)
            for chunk in chunks[1:]:
                sink.text(chunk)
            return GenerationResult(
                self.reply, "stop", completion_tokens=len(chunks), prompt_tokens=7, ttft_ms=5.0, generate_ms=50.0
            )
        finally:
            unregister()

    def forget(self, session: str | None) -> bool:
        return False

    def unsupported_reason(self, request: GenerationRequest) -> str | None:
        if self.abi == "1.2" and request.sampling:
            return "per-request sampling settings need runtime 1.3; the loaded runtime uses the 1.2 layout"
        return None

    def wait_settled(self, timeout: float) -> RuntimeStatus:
        return self.status


@dataclass
class Served:
    runtime: FakeRuntime
    scheduler: Scheduler
    server: ApiServer
    url: str

    def client(self, **kwargs: Any) -> ollama.Client:
        return ollama.Client(host=self.url, **kwargs)


def serve(runtime: FakeRuntime, *, queue_size: int = 4, token: str | None = None) -> Served:
    port = free_port()
    api: dict[str, Any] = {"enabled": True, "port": port}
    if token is not None:
        api["token"] = token
    settings = Settings(api=api, limits={"queue_size": queue_size, "max_prompt_bytes": 4000})
    scheduler = Scheduler(runtime, queue_size=queue_size, hang_grace_s=1.0)
    scheduler.start()
    server = ApiServer(settings, scheduler, runtime)
    server.start()
    return Served(runtime, scheduler, server, f"http://127.0.0.1:{port}")


@pytest.fixture
def served() -> Iterator[Served]:
    s = serve(FakeRuntime())
    yield s
    s.runtime.release.set()
    s.scheduler.shutdown(1.0)
    s.server.stop()


def test_model_endpoints_describe_the_loaded_model(served: Served) -> None:
    client = served.client()
    listed = client.list()
    assert [m.model for m in listed.models] == [f"{MODEL}:latest"]
    details = listed.models[0].details
    assert details is not None and details.parameter_size == "1.5B" and details.quantization_level == "W8A8"
    shown = client.show(MODEL)
    assert shown.capabilities is not None and "tools" in shown.capabilities
    assert shown.modelinfo is not None and shown.modelinfo["rkllm.abi"] == "1.3"
    assert [m.model for m in client.ps().models] == [f"{MODEL}:latest"]
    assert client.pull(MODEL).status == "success"
    assert httpx.get(f"{served.url}/api/version").json()["version"]
    assert httpx.get(f"{served.url}/").text == "Ollama is running"


def test_unknown_model_is_404_everywhere(served: Served) -> None:
    client = served.client()
    for call in (
        lambda: client.show("llama3"),
        lambda: client.pull("llama3"),
        lambda: client.chat("llama3", messages=[{"role": "user", "content": "hi"}]),
        lambda: client.generate("llama3", "hi"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert caught.value.status_code == 404
        assert "llama3" in caught.value.error


def test_chat_streamed_and_not(served: Served) -> None:
    client = served.client()
    whole = client.chat(MODEL, messages=[{"role": "user", "content": "Is the light on?"}])
    assert whole.message.content == "The kitchen light is on."
    assert whole.done and whole.done_reason == "stop"
    assert whole.eval_count == 4 and whole.prompt_eval_count == 7
    parts = list(client.chat(MODEL, messages=[{"role": "user", "content": "Is the light on?"}], stream=True))
    assert "".join(p.message.content or "" for p in parts) == "The kitchen light is on."
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert served.runtime.requests[-1].role == "user"


def test_generate_streamed_and_not(served: Served) -> None:
    client = served.client()
    assert client.generate(MODEL, "Is it on?", system="Be brief.").response == "The kitchen light is on."
    assert served.runtime.requests[-1].system == "Be brief."
    assert served.runtime.requests[-1].session is None
    parts = list(client.generate(MODEL, "Is it on?", stream=True))
    assert "".join(p.response or "" for p in parts) == "The kitchen light is on."


def test_options_reach_the_request(served: Served) -> None:
    client = served.client()
    client.chat(
        MODEL,
        messages=[{"role": "user", "content": "hi"}],
        options={"temperature": 0.2, "top_k": 5, "num_predict": 16, "num_ctx": 8192},
        think=True,
        keep_alive="5m",
    )
    request = served.runtime.requests[-1]
    assert request.sampling == {"temperature": 0.2, "top_k": 5.0}
    assert request.max_new_tokens == 16
    assert request.enable_thinking


def test_bad_requests_are_400(served: Served) -> None:
    client = served.client()
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(MODEL, messages=[{"role": "user", "content": "hi"}], options={"top_p": 5})
    assert caught.value.status_code == 400 and "top_p" in caught.value.error
    bad_json = httpx.post(f"{served.url}/api/chat", content=b"{not json")
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    last_assistant = httpx.post(
        f"{served.url}/api/chat",
        json={"model": MODEL, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    )
    assert last_assistant.status_code == 400
    too_long = httpx.post(f"{served.url}/api/generate", json={"model": MODEL, "prompt": "x" * 5000})
    assert too_long.status_code == 400 and "max_prompt_bytes" in too_long.json()["error"]
    assert served.runtime.requests == []  # none of them reached the runtime


def test_sampling_on_the_12_layout_is_refused_like_on_mqtt() -> None:
    s = serve(FakeRuntime(abi="1.2"))
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            s.client().generate(MODEL, "hi", options={"temperature": 0.1})
        assert caught.value.status_code == 400 and "1.2" in caught.value.error
        assert s.client().generate(MODEL, "hi", options={"num_predict": 4}).done  # a token cap works on both
    finally:
        s.scheduler.shutdown(1.0)
        s.server.stop()


def test_tool_calls_become_message_tool_calls_and_are_not_streamed_as_text() -> None:
    call = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}\n</tool_call>'
    s = serve(FakeRuntime(reply=call, pieces=9))
    tools = [{"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object"}}}]
    try:
        parts = list(
            s.client().chat(MODEL, messages=[{"role": "user", "content": "light on"}], tools=tools, stream=True)
        )
        assert all("<tool_call>" not in (p.message.content or "") for p in parts)
        calls = [c for p in parts for c in p.message.tool_calls or ()]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
            ("HassTurnOn", {"name": "kitchen light"})
        ]
        assert json.loads(s.runtime.requests[-1].tools or "[]") == tools
    finally:
        s.scheduler.shutdown(1.0)
        s.server.stop()


def test_format_answer_is_checked() -> None:
    schema = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}
    s = serve(FakeRuntime(reply='```json\n{"on": true}\n```'))
    try:
        answer = s.client().chat(MODEL, messages=[{"role": "user", "content": "on?"}], format=schema)
        assert json.loads(answer.message.content or "") == {"on": True}
        assert "Schema:" in s.runtime.requests[-1].prompt
        s.runtime.reply = "yes"
        with pytest.raises(ollama.ResponseError) as caught:
            list(s.client().chat(MODEL, messages=[{"role": "user", "content": "on?"}], format=schema, stream=True))
        assert "not valid JSON" in caught.value.error
    finally:
        s.scheduler.shutdown(1.0)
        s.server.stop()


def test_follow_up_turn_reuses_the_conversation(served: Served) -> None:
    client = served.client()
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a house."},
        {"role": "user", "content": "Is the light on?"},
    ]
    first = client.chat(MODEL, messages=history)
    history += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "And now?"}]
    client.chat(MODEL, messages=history)
    one, two = served.runtime.requests
    assert one.session is not None and two.session == one.session
    assert two.prompt == "And now?"
    assert two.replay_prompt is not None and "Is the light on?" in two.replay_prompt


def test_queue_full_is_503_and_bearer_token_is_required() -> None:
    s = serve(FakeRuntime(gated=True), queue_size=0, token="s3cret")
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            s.client().list()
        assert caught.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as caught:
            s.client(headers={"Authorization": "Bearer wrong"}).list()
        assert caught.value.status_code == 401
        client = s.client(headers={"Authorization": "Bearer s3cret"})
        assert client.list().models
        done: list[Any] = []
        first = threading.Thread(target=lambda: done.append(client.generate(MODEL, "one")))
        first.start()
        assert s.runtime.started.wait(WAIT_S)
        with pytest.raises(ollama.ResponseError) as caught:
            client.generate(MODEL, "two")
        assert caught.value.status_code == 503 and "queue_size" in caught.value.error
        s.runtime.release.set()
        first.join(WAIT_S)
        assert done and done[0].response == "The kitchen light is on."
    finally:
        s.runtime.release.set()
        s.scheduler.shutdown(1.0)
        s.server.stop()


def test_client_that_goes_away_cancels_its_generation() -> None:
    s = serve(FakeRuntime(gated=True))
    try:
        with (
            httpx.Client(base_url=s.url, timeout=WAIT_S) as http,
            http.stream(
                "POST", "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            ) as response,
        ):
            first_line = next(response.iter_lines())
            assert json.loads(first_line)["done"] is False
        # Leaving the block closed the connection mid-stream.
        assert s.runtime.cancels, "the run never started"
        token = s.runtime.cancels[0]
        woke = threading.Event()
        token.on_cancel(woke.set)
        assert woke.wait(WAIT_S)
        assert token.reason == "disconnect"
    finally:
        s.runtime.release.set()
        s.scheduler.shutdown(1.0)
        s.server.stop()


def test_a_taken_port_is_a_clear_start_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runtime = FakeRuntime()
        scheduler = Scheduler(runtime, queue_size=1, hang_grace_s=1.0)
        server = ApiServer(Settings(api={"enabled": True, "port": port}), scheduler, runtime)
        with pytest.raises(ApiStartError, match=str(port)):
            server.start()


def test_listening_beyond_loopback_is_logged_as_a_warning_without_the_token() -> None:
    runtime = FakeRuntime()
    settings = Settings(api={"enabled": True, "host": "0.0.0.0", "port": free_port(), "token": "hush-hush"})
    server = ApiServer(settings, Scheduler(runtime, queue_size=1, hang_grace_s=1.0), runtime)
    with structlog.testing.capture_logs() as logs:
        server.start()
        server.stop()
    (warning,) = [e for e in logs if e["event"] == "api_exposed"]
    assert warning["log_level"] == "warning" and warning["host"] == "0.0.0.0" and warning["token"] is True
    assert "hush-hush" not in repr(logs)


class QueueWatch:
    """A scheduler observer that lets a test wait for a queue depth (the scheduler tells it every change)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.cond = threading.Condition()

    def on_change(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def wait_depth(self, depth: int) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.scheduler.snapshot().queue_depth == depth, WAIT_S)
        assert ok, f"the queue never held {depth}"


def test_client_that_goes_away_while_queued_leaves_the_queue() -> None:
    runtime = FakeRuntime(gated=True)
    port = free_port()
    settings = Settings(api={"enabled": True, "port": port})
    scheduler = Scheduler(runtime, queue_size=4, hang_grace_s=1.0)
    watch = QueueWatch(scheduler)
    scheduler.observe(watch)
    scheduler.start()
    server = ApiServer(settings, scheduler, runtime)
    server.start()
    try:
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        running = threading.Thread(target=lambda: client.generate(MODEL, "first"))
        running.start()
        assert runtime.started.wait(WAIT_S)
        body = json.dumps({"model": MODEL, "prompt": "second"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(
                b"POST /api/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            watch.wait_depth(1)
        # The connection is closed while the request waits: it leaves the queue at once, never to run.
        watch.wait_depth(0)
        runtime.release.set()
        running.join(WAIT_S)
        assert [r.prompt for r in runtime.requests] == ["first"]
        assert scheduler.snapshot().requests_total == 2
    finally:
        runtime.release.set()
        scheduler.shutdown(1.0)
        server.stop()


def test_thinking_is_returned_only_when_asked_for_and_never_as_the_answer() -> None:
    s = serve(FakeRuntime(reply="<think>The user greets me.</think>\n\nHello!", pieces=7))
    try:
        client = s.client()
        asked = client.chat(MODEL, messages=[{"role": "user", "content": "hi"}], think=True)
        assert (asked.message.thinking, asked.message.content) == ("The user greets me.", "Hello!")
        assert s.runtime.requests[-1].enable_thinking
        unasked = list(client.generate(MODEL, "hi", stream=True))
        assert "".join(p.response or "" for p in unasked) == "Hello!"
        assert all(not p.thinking for p in unasked)
        assert not s.runtime.requests[-1].enable_thinking
    finally:
        s.scheduler.shutdown(1.0)
        s.server.stop()


def test_home_assistant_style_call_with_the_async_client() -> None:
    """The call Home Assistant's Ollama integration makes: AsyncClient, streamed, tools, keep_alive -1, num_ctx."""
    call = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen light", "area": ""}}\n</tool_call>'
    s = serve(FakeRuntime(reply=call, pieces=5))
    tools = [{"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object"}}}]

    async def converse() -> list[Any]:
        client = ollama.AsyncClient(host=s.url)
        stream = await client.chat(
            model=MODEL,
            messages=[{"role": "system", "content": "You are a house."}, {"role": "user", "content": "light on"}],
            tools=tools,
            stream=True,
            keep_alive=-1,
            options={"num_ctx": 8192},
            think=None,
            format=None,
        )
        return [part async for part in stream]

    try:
        parts = asyncio.run(converse())
        calls = [c for p in parts for c in p.message.tool_calls or ()]
        assert [c.function.name for c in calls] == ["HassTurnOn"]
        assert parts[-1].done and parts[-1].done_reason == "stop"
        assert s.runtime.requests[-1].system == "You are a house."
    finally:
        s.scheduler.shutdown(1.0)
        s.server.stop()
