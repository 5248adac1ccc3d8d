"""The cdefs and the simulated runtime against the struct layouts of the official headers.

The numbers come from compiling each vendor rkllm.h with g++ on LP64, pinned below. A cdef typo
here would be a segfault on a board, so every size and offset the binding depends on is pinned.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cffi import FFI

from rkllm_mqtt.runtime.abi import sim_library_path
from rkllm_mqtt.runtime.cdefs import ABIS, cdef_for

SIM_SOURCE = Path(__file__).resolve().parents[1] / "rkllm_mqtt" / "runtime" / "sim" / "rkllm_sim.c"

# (kind, type, field or None, expected) for each layout
COMMON = [
    ("sizeof", "RKLLMExtendParam", None, 120),
    ("offsetof", "RKLLMExtendParam", "enabled_cpus_mask", 8),
    ("offsetof", "RKLLMExtendParam", "n_batch", 12),
    ("offsetof", "RKLLMExtendParam", "reserved", 14),
    ("offsetof", "RKLLMParam", "skip_special_token", 56),
    ("offsetof", "RKLLMInput", "input_type", 12),
    ("offsetof", "RKLLMInput", "prompt_input", 16),
    ("offsetof", "RKLLMInferParam", "lora_params", 8),
    ("offsetof", "RKLLMInferParam", "prompt_cache_params", 16),
    ("sizeof", "RKLLMResult", None, 72),
    ("offsetof", "RKLLMResult", "perf", 48),
    ("sizeof", "RKLLMPerfStat", None, 20),
    ("sizeof", "RKLLMLoraAdapter", None, 24),
    ("sizeof", "RKLLMPromptCacheParam", None, 16),
    ("sizeof", "RKLLMCrossAttnParam", None, 40),
]
LAYOUT = {
    "1.2": [
        ("sizeof", "RKLLMParam", None, 208),
        ("offsetof", "RKLLMParam", "extend_param", 88),
        ("sizeof", "RKLLMInput", None, 64),
        ("sizeof", "RKLLMMultiModalInput", None, 48),
        ("sizeof", "RKLLMInferParam", None, 32),
        ("offsetof", "RKLLMInferParam", "keep_history", 24),
    ],
    "1.3": [
        ("sizeof", "RKLLMParam", None, 184),
        ("offsetof", "RKLLMParam", "extend_param", 60),
        ("sizeof", "RKLLMInput", None, 160),
        ("sizeof", "RKLLMMultiModalInput", None, 144),
        ("sizeof", "RKLLMInferParam", None, 40),
        ("offsetof", "RKLLMInferParam", "sampling_params", 24),
        ("offsetof", "RKLLMInferParam", "keep_history", 32),
        ("offsetof", "RKLLMInferParam", "max_new_tokens", 36),
        ("sizeof", "RKLLMSamplingParam", None, 36),
        ("sizeof", "RKLLMCallback", None, 48),
    ],
}

lp64 = pytest.mark.skipif(FFI().sizeof("void *") != 8, reason="the pinned numbers are for LP64 (aarch64, x86_64)")


def _ffi(abi: str) -> FFI:
    ffi = FFI()
    ffi.cdef(cdef_for(abi))
    return ffi


@lp64
@pytest.mark.parametrize("abi", ABIS)
def test_cdef_sizes_and_offsets(abi: str) -> None:
    ffi = _ffi(abi)
    for kind, ctype, field, expected in COMMON + LAYOUT[abi]:
        actual = ffi.sizeof(ctype) if field is None else ffi.offsetof(ctype, field)
        assert actual == expected, f"{abi}: {kind}({ctype}{', ' + field if field else ''}) = {actual}, want {expected}"


def test_callback_and_init_signatures_differ_between_layouts() -> None:
    # 1.2 passes the function pointer itself to rkllm_init; 1.3 passes RKLLMCallback*.
    assert "RKLLMParam *param, LLMResultCallback callback)" in cdef_for("1.2")
    assert "RKLLMParam *param, RKLLMCallback *callback)" in cdef_for("1.3")
    for abi in ABIS:
        ffi = _ffi(abi)
        assert ffi.getctype("LLMResultCallback") == "int(*)(RKLLMResult *, void *, LLMCallState)"
        assert ffi.sizeof("LLMCallState") == 4


@pytest.mark.parametrize("abi", ABIS)
def test_run_async_is_not_even_declared(abi: str) -> None:
    assert "rkllm_run_async" not in cdef_for(abi).split('"""')[-1]
    lib = _ffi(abi).dlopen(str(sim_library_path(abi)))
    with pytest.raises(AttributeError):
        _ = lib.rkllm_run_async  # the sim exports it, but the cdef must not let anyone reach it


@lp64
@pytest.mark.parametrize("abi", ABIS)
def test_sim_layout_agrees_with_cdef_through_a_struct_return(abi: str) -> None:
    # rkllm_createDefaultParam returns RKLLMParam by value: fields past a misplaced one would read garbage.
    lib = _ffi(abi).dlopen(str(sim_library_path(abi)))
    param = lib.rkllm_createDefaultParam()
    assert param.max_context_len == 512
    assert param.top_k == 40
    assert param.n_keep == -1
    assert param.top_p == pytest.approx(0.9)
    assert param.mirostat_tau == pytest.approx(5.0)
    assert param.mirostat_eta == pytest.approx(0.1)
    assert param.is_async is False
    assert param.extend_param.n_batch == 1
    assert bytes(param.extend_param.reserved) == bytes(104)


@pytest.mark.parametrize("abi", ABIS)
def test_c_source_asserts_the_same_numbers(abi: str) -> None:
    # The sim's structs are checked at compile time; its messages name the layout ("1.2 RKLLMParam size").
    source = SIM_SOURCE.read_text()
    for _kind, ctype, field, expected in LAYOUT[abi]:
        if ctype == "RKLLMMultiModalInput":
            continue  # checked through sizeof(RKLLMInput)
        expr = f"sizeof({ctype})" if field is None else f"offsetof({ctype}, {field})"
        pattern = rf'_Static_assert\({re.escape(expr)} == {expected}, "{re.escape(abi)} '
        assert re.search(pattern, source), f"{SIM_SOURCE.name} has no _Static_assert({expr} == {expected}) for {abi}"
    for expr, expected in (("sizeof(RKLLMResult)", 72), ("offsetof(RKLLMResult, perf)", 48)):
        assert f"_Static_assert({expr} == {expected}," in source
