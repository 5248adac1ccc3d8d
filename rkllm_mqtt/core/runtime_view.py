"""How the scheduler and the front doors see the runtime: narrow interfaces, each written once.

The worker supervisor (``runtime/supervisor.py``) satisfies all of them; tests use small fakes.
"""

from __future__ import annotations

from typing import Protocol

from rkllm_mqtt.payloads import ModelInfo, RuntimeStatus


class StreamSink(Protocol):
    """Where the runtime puts decoded text as it arrives. It may buffer text until ``flush_deadline()``."""

    def text(self, chunk: str) -> None: ...

    def flush_deadline(self) -> float | None: ...

    def flush(self) -> None: ...


class RuntimeStatusView(Protocol):
    """What every front door shows of the runtime: its status, its last error and the loaded model."""

    @property
    def status(self) -> RuntimeStatus: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def model_info(self) -> ModelInfo | None: ...


class RuntimeView(RuntimeStatusView, Protocol):
    """The runtime with its supervision, as the MQTT door reports it in ``health``."""

    @property
    def restarts(self) -> int: ...

    def alive(self) -> bool: ...
