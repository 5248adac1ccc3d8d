"""cffi ABI-mode binding of the RKLLM runtime (``librkllmrt.so`` or the simulated runtime).

One ``FFI`` per layout (see :mod:`rkllm_mqtt.runtime.cdefs`). Every C return code goes through :meth:`_check`.
Memory that C may still read is kept referenced by this object for exactly as long as C may read it: the
callback and its userdata handle and the RKLLMParam strings for the life of the handle, LoRA strings likewise,
and everything handed to one ``rkllm_run`` for the duration of that call.

The result callback runs on the runtime's thread while ``rkllm_run`` blocks. It only copies the bytes (and the
perf numbers at FINISH) and calls the handler: no lock, no logging, nothing that can block the NPU. It always
returns 0 to C, also when the handler raises. With a :class:`~rkllm_mqtt.runtime.relay.Relay` (the worker's
case) the runtime calls the relay's C callback instead, which writes token text to the event pipe itself and
passes only the other states to the Python callback.

``rkllm_run_async`` is never called and not even declared: it never returns in runtime 1.2.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cffi import FFI

from rkllm_mqtt.errors import AbiError, RequestError, RuntimeCallError, RuntimeLoadError
from rkllm_mqtt.runtime.cdefs import (
    ABIS,
    STATE_ERROR,
    STATE_FINISH,
    STATE_NORMAL,
    STATE_WAITING,
    cdef_for,
    per_request_refusal,
)
from rkllm_mqtt.runtime.relay import Relay

__all__ = [
    "STATE_ERROR",
    "STATE_FINISH",
    "STATE_NORMAL",
    "STATE_WAITING",
    "InitParams",
    "PerfStats",
    "ResultHandler",
    "RkllmBinding",
    "Sampling",
]


@dataclass(frozen=True)
class PerfStats:
    """RKLLMPerfStat, copied at FINISH."""

    prefill_time_ms: float
    prefill_tokens: int
    generate_time_ms: float
    generate_tokens: int
    memory_usage_mb: float


@dataclass(frozen=True)
class InitParams:
    """What goes into RKLLMParam. None keeps the value of ``rkllm_createDefaultParam()``."""

    model_path: str
    max_context_len: int | None = None
    max_new_tokens: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    skip_special_token: bool | None = None
    enabled_cpus_mask: int | None = None
    embed_flash: bool | None = None


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling (ABI 1.3 only). None keeps the init-time value."""

    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None

    def names(self) -> list[str]:
        """The settings this request changes."""
        return [name for name in ("top_k", "top_p", "temperature", "repeat_penalty") if getattr(self, name) is not None]

    def is_empty(self) -> bool:
        return not self.names()


ResultHandler = Callable[[int, bytes | None, PerfStats | None], None]
"""Called on the runtime's thread with (state, a copy of the text bytes or None, perf at FINISH or None)."""

# Init-time sampling values read back from RKLLMParam: the base of each per-request RKLLMSamplingParam (1.3).
_SAMPLING_FIELDS: Final = (
    "top_k",
    "top_p",
    "temperature",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)


def _callback_onerror(exc_type: Any, exc_value: Any, traceback: Any) -> int:
    # Whatever goes wrong in the callback, C must get 0 (1 would pause generation). Returning normally from
    # onerror also tells cffi the error is handled, so nothing is printed from the runtime's thread.
    return 0


class RkllmBinding:
    """One runtime library and at most one model handle on it."""

    def __init__(self, library_path: str, abi: str) -> None:
        self._library_path = library_path
        self._abi = abi
        self._ffi: Any = None
        self._lib: Any = None
        self._handle: Any = None
        self._on_result: ResultHandler | None = None
        self._handler_error: BaseException | None = None
        self._userdata: Any = None
        # C-visible memory kept alive for the life of the handle (see the module docstring).
        self._handle_keepalive: list[Any] = []
        self._template_keepalive: tuple[Any, ...] = ()
        self._init_sampling: dict[str, float] = {}

    @property
    def abi(self) -> str:
        return self._abi

    @property
    def library_path(self) -> str:
        return self._library_path

    @property
    def last_handler_error(self) -> BaseException | None:
        """The first exception the result handler raised during the last run (it never reaches C)."""
        return self._handler_error

    # -- lifecycle --

    def open(self) -> None:
        """dlopen the library with the cdef of the configured layout."""
        if self._abi not in ABIS:
            raise AbiError(f'unknown ABI layout "{self._abi}"; expected "1.2" or "1.3"')
        if self._lib is not None:
            return
        ffi = FFI()
        ffi.cdef(cdef_for(self._abi))
        try:
            lib = ffi.dlopen(self._library_path)
        except OSError as exc:
            raise RuntimeLoadError(f"cannot load runtime library {self._library_path}: {exc}") from exc
        self._ffi = ffi
        self._lib = lib

    def init(self, params: InitParams, on_result: ResultHandler, relay: Relay | None = None) -> None:
        """rkllm_init with ``params``; ``on_result`` receives every result callback of later runs.

        With a ``relay``, the runtime calls the relay's C callback, which writes token text to the event pipe
        itself: ``on_result`` then receives only FINISH and ERROR.
        """
        ffi, lib = self._require_open()
        if self._handle is not None:
            raise RuntimeLoadError("the runtime already holds a model; destroy() it before init() again")

        param = ffi.new("RKLLMParam *")
        param[0] = lib.rkllm_createDefaultParam()
        model_path = ffi.new("char[]", os.fsencode(params.model_path))
        param.model_path = model_path
        for name in (
            "max_context_len",
            "max_new_tokens",
            "top_k",
            "top_p",
            "temperature",
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(params, name)
            if value is not None:
                setattr(param, name, value)
        if params.skip_special_token is not None:
            param.skip_special_token = params.skip_special_token
        if params.enabled_cpus_mask is not None:
            param.extend_param.enabled_cpus_mask = params.enabled_cpus_mask
            param.extend_param.enabled_cpus_num = bin(params.enabled_cpus_mask).count("1")
        if params.embed_flash is not None:
            param.extend_param.embed_flash = 1 if params.embed_flash else 0

        python_callback = ffi.callback(
            "LLMResultCallback", _make_result_callback(ffi), error=0, onerror=_callback_onerror
        )
        callback = python_callback
        if relay is not None:
            relay.setup(int(ffi.cast("uintptr_t", python_callback)))
            callback = ffi.cast("LLMResultCallback", relay.callback_address())
        userdata = ffi.new_handle(self)
        handle_out = ffi.new("LLMHandle *")
        self._on_result = on_result  # before rkllm_init, in case a runtime calls back from it
        if self._abi == "1.3":
            callbacks = ffi.new("RKLLMCallback *")
            callbacks.result_callback = callback
            callbacks.result_userdata = userdata
            keepalive: list[Any] = [param, model_path, python_callback, callback, relay, userdata, callbacks]
            ret = lib.rkllm_init(handle_out, param, callbacks)
        else:
            keepalive = [param, model_path, python_callback, callback, relay, userdata]
            ret = lib.rkllm_init(handle_out, param, callback)
        if ret != 0:
            self._on_result = None
        self._check(ret, "rkllm_init", f"model {params.model_path}")

        self._handle = handle_out[0]
        self._handle_keepalive = keepalive
        self._userdata = userdata
        self._init_sampling = {name: getattr(param, name) for name in _SAMPLING_FIELDS}

    def destroy(self) -> None:
        """rkllm_destroy; a no-op without a handle.

        If the runtime refuses (a run still in flight), the handle and everything C may use stay as they were,
        so destroy() can be retried after the run ends.
        """
        if self._handle is None:
            return
        self._check(self._lib.rkllm_destroy(self._handle), "rkllm_destroy")
        # Only now does C hold none of these any more.
        self._handle = None
        self._handle_keepalive = []
        self._template_keepalive = ()
        self._on_result = None
        self._userdata = None

    # -- inference --

    def run(
        self,
        prompt: str,
        *,
        keep_history: bool,
        role: str = "user",
        enable_thinking: bool = False,
        max_new_tokens: int | None = None,
        sampling: Sampling | None = None,
        lora_name: str | None = None,
        prompt_cache_path: str | None = None,
        save_prompt_cache: bool = False,
    ) -> None:
        """rkllm_run: blocks until the reply is finished, aborted or failed; results go to the handler.

        ``max_new_tokens`` (<= 0 means the init value) and ``sampling`` need ABI 1.3; on 1.2 they are refused
        with code ``unsupported`` (the worker enforces a token cap on 1.2 itself).
        """
        ffi, lib = self._require_open()
        handle = self._require_handle()
        refusal = per_request_refusal(
            self._abi,
            sampling=sampling.names() if sampling is not None else (),
            max_new_tokens=max_new_tokens is not None,
        )
        if refusal is not None:
            raise RequestError("unsupported", refusal)
        if "\x00" in prompt:
            raise ValueError("the prompt contains a NUL character, which C would cut it at")
        if save_prompt_cache and prompt_cache_path is None:
            raise ValueError("save_prompt_cache needs prompt_cache_path")

        # Everything below is referenced by C during the call only; the locals keep it alive until we return.
        role_c = ffi.new("char[]", role.encode("utf-8"))
        prompt_c = ffi.new("char[]", prompt.encode("utf-8"))
        rkllm_input = ffi.new("RKLLMInput *")
        rkllm_input.role = role_c
        rkllm_input.enable_thinking = enable_thinking
        rkllm_input.input_type = lib.RKLLM_INPUT_PROMPT
        rkllm_input.prompt_input = prompt_c

        infer = ffi.new("RKLLMInferParam *")
        infer.mode = lib.RKLLM_INFER_GENERATE
        infer.keep_history = 1 if keep_history else 0
        lora_c = lora_param = cache_path_c = cache_param = sampling_c = None
        if lora_name is not None:
            lora_c = ffi.new("char[]", lora_name.encode("utf-8"))
            lora_param = ffi.new("RKLLMLoraParam *")
            lora_param.lora_adapter_name = lora_c
            infer.lora_params = lora_param
        if prompt_cache_path is not None:
            cache_path_c = ffi.new("char[]", os.fsencode(prompt_cache_path))
            cache_param = ffi.new("RKLLMPromptCacheParam *")
            cache_param.save_prompt_cache = 1 if save_prompt_cache else 0
            cache_param.prompt_cache_path = cache_path_c
            infer.prompt_cache_params = cache_param
        if self._abi == "1.3":
            if sampling is not None and not sampling.is_empty():
                sampling_c = ffi.new("RKLLMSamplingParam *", self._init_sampling)
                for name in ("top_k", "top_p", "temperature", "repeat_penalty"):
                    value = getattr(sampling, name)
                    if value is not None:
                        setattr(sampling_c, name, value)
                infer.sampling_params = sampling_c
            infer.max_new_tokens = max_new_tokens if max_new_tokens is not None else 0

        self._handler_error = None
        # Passed on both layouts: 1.2 stores no userdata at init (1.3 would fall back to result_userdata).
        ret = lib.rkllm_run(handle, rkllm_input, infer, self._userdata)
        del role_c, prompt_c, lora_c, lora_param, cache_path_c, cache_param, sampling_c
        self._check(ret, "rkllm_run")

    def abort(self) -> None:
        """rkllm_abort; safe from another thread while run() blocks. A no-op without a handle."""
        handle = self._handle
        if handle is None:
            return
        self._check(self._lib.rkllm_abort(handle), "rkllm_abort")

    def clear_kv_cache(self, keep_system_prompt: bool = False) -> None:
        """Forget the conversation held in the KV cache (the whole cache: no position ranges)."""
        ffi, lib = self._require_open()
        handle = self._require_handle()
        ret = lib.rkllm_clear_kv_cache(handle, 1 if keep_system_prompt else 0, ffi.NULL, ffi.NULL)
        self._check(ret, "rkllm_clear_kv_cache")

    def set_chat_template(self, system_prompt: str, prompt_prefix: str, prompt_postfix: str) -> None:
        ffi, lib = self._require_open()
        handle = self._require_handle()
        strings = tuple(ffi.new("char[]", s.encode("utf-8")) for s in (system_prompt, prompt_prefix, prompt_postfix))
        ret = lib.rkllm_set_chat_template(handle, *strings)
        self._check(ret, "rkllm_set_chat_template")
        # The runtime copies them; keeping the latest set costs nothing and is safe if some version does not.
        self._template_keepalive = strings

    def set_function_tools(self, system_prompt: str, tools: str, tool_response_str: str) -> None:
        """rkllm_set_function_tools (runtime 1.2.1+): the tools (a JSON array) the model may call, the system prompt
        that goes with them, and the tag that marks a tool's result in a turn of role ``tool``."""
        ffi, lib = self._require_open()
        handle = self._require_handle()
        strings = tuple(ffi.new("char[]", s.encode("utf-8")) for s in (system_prompt, tools, tool_response_str))
        self._check(lib.rkllm_set_function_tools(handle, *strings), "rkllm_set_function_tools")
        # Kept like the chat template's strings, in case a runtime keeps the pointers.
        self._template_keepalive = (*self._template_keepalive, *strings)

    def load_lora(self, path: str, name: str, scale: float) -> None:
        ffi, lib = self._require_open()
        handle = self._require_handle()
        path_c = ffi.new("char[]", os.fsencode(path))
        name_c = ffi.new("char[]", name.encode("utf-8"))
        adapter = ffi.new("RKLLMLoraAdapter *")
        adapter.lora_adapter_path = path_c
        adapter.lora_adapter_name = name_c
        adapter.scale = scale
        ret = lib.rkllm_load_lora(handle, adapter)
        self._check(ret, "rkllm_load_lora", f"adapter {name} from {path}")
        # The header does not say the runtime copies them, so they live as long as the handle.
        self._handle_keepalive.extend((path_c, name_c, adapter))

    def load_prompt_cache(self, path: str) -> None:
        ffi, lib = self._require_open()
        handle = self._require_handle()
        path_c = ffi.new("char[]", os.fsencode(path))
        self._check(lib.rkllm_load_prompt_cache(handle, path_c), "rkllm_load_prompt_cache", path)

    # -- internals --

    @staticmethod
    def _check(ret: int, function: str, detail: str = "") -> None:
        """The one place C return codes become exceptions."""
        if ret != 0:
            raise RuntimeCallError(function, int(ret), detail)

    def _require_open(self) -> tuple[Any, Any]:
        if self._lib is None:
            raise RuntimeLoadError(f"runtime library {self._library_path} is not loaded; call open() first")
        return self._ffi, self._lib

    def _require_handle(self) -> Any:
        if self._handle is None:
            raise RuntimeLoadError("no model is loaded; call init() first")
        return self._handle

    def _deliver(self, state: int, text: bytes | None, perf: PerfStats | None) -> None:
        handler = self._on_result
        if handler is None:
            return
        try:
            handler(state, text, perf)
        except BaseException as exc:
            # Recorded, never raised into C; the run goes on. Plain attribute writes: no lock on this thread.
            if self._handler_error is None:
                self._handler_error = exc


def _make_result_callback(ffi: Any) -> Callable[[Any, Any, int], int]:
    """The Python side of LLMResultCallback for one FFI; the binding comes from the userdata handle."""

    def result_callback(result: Any, userdata: Any, state: int) -> int:
        # Runs on the runtime's thread. result->text is only valid now: ffi.string copies it.
        text = ffi.string(result.text) if result.text != ffi.NULL else None
        perf = None
        if state == STATE_FINISH:
            p = result.perf
            perf = PerfStats(
                prefill_time_ms=float(p.prefill_time_ms),
                prefill_tokens=int(p.prefill_tokens),
                generate_time_ms=float(p.generate_time_ms),
                generate_tokens=int(p.generate_tokens),
                memory_usage_mb=float(p.memory_usage_mb),
            )
        if userdata != ffi.NULL:
            binding: RkllmBinding = ffi.from_handle(userdata)
            binding._deliver(int(state), text, perf)
        return 0

    return result_callback
