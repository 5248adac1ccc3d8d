"""The runtime supervisor seen through the scheduler's RuntimeRunner protocol.

The supervisor takes no cancel token yet: a cancel is passed on as ``supervisor.abort()``, and its results are
copied into the shared result type. This adapter goes away once the supervisor takes the token itself.
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
        if request.sampling and self.supervisor.abi == "1.2":
            return (
                f"per-request {', '.join(sorted(request.sampling))} need runtime 1.3; "
                "the loaded runtime uses the 1.2 layout (max_new_tokens works on both)"
            )
        return None

    def generate(self, request: GenerationRequest, sink: StreamSink, cancel: CancelToken) -> GenerationResult:
        if cancel.cancelled:
            return GenerationResult("", "abort", "aborted", "aborted before it started")
        unregister = cancel.on_cancel(self.supervisor.abort)
        try:
            result = self.supervisor.generate(
                sup.GenerationRequest(
                    prompt=request.prompt,
                    timeout_s=request.timeout_s,
                    session=request.session,
                    system=request.system,
                    max_new_tokens=request.max_new_tokens,
                    sampling=request.sampling,
                ),
                sink,
            )
        finally:
            unregister()
        return GenerationResult(
            text=result.text,
            finish_reason=result.finish_reason,
            error_code=result.error_code,
            error_message=result.error_message,
            completion_tokens=result.completion_tokens,
            prompt_tokens=result.prompt_tokens,
            ttft_ms=result.ttft_ms,
            generate_ms=result.generate_ms,
        )
