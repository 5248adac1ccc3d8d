"""The runtime supervisor seen through the scheduler's RuntimeRunner protocol.

The supervisor takes the cancel token and the shared request and result types itself; this adapter only
narrows it to what the scheduler uses.
"""

from __future__ import annotations

from rkllm_mqtt.core.jobs import CancelToken, GenerationRequest, GenerationResult
from rkllm_mqtt.core.scheduler import StreamSink
from rkllm_mqtt.payloads import ModelInfo, RuntimeStatus
from rkllm_mqtt.runtime import supervisor as sup


class SupervisorRunner:
    def __init__(self, supervisor: sup.RuntimeSupervisor) -> None:
        self.supervisor = supervisor

    @property
    def status(self) -> RuntimeStatus:
        return self.supervisor.status

    @property
    def last_error(self) -> str | None:
        return self.supervisor.last_error

    @property
    def abi(self) -> str | None:
        return self.supervisor.abi

    @property
    def model_info(self) -> ModelInfo | None:
        return self.supervisor.model_info

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    def alive(self) -> bool:
        return self.supervisor.alive()

    def forget(self, session: str | None) -> bool:
        return self.supervisor.forget(session)

    def wait_settled(self, timeout: float) -> RuntimeStatus:
        return self.supervisor.wait_settled(timeout)

    def unsupported_reason(self, request: GenerationRequest) -> str | None:
        return self.supervisor.unsupported_reason(request)

    def generate(self, request: GenerationRequest, sink: StreamSink, cancel: CancelToken) -> GenerationResult:
        return self.supervisor.generate(request, sink, cancel)
