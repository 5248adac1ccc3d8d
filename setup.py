"""Build hook: compiles the simulated RKLLM runtime, once per ABI layout.

The simulated runtime is plain C that exports the vendor's functions. It is built as a setuptools
Extension only because that is the one build step every install path runs (wheel, sdist, editable);
nothing imports it as a Python module: the binding dlopen()s it like ``librkllmrt.so``.
"""

from setuptools import Extension, setup

SIM_DIR = "rkllm_mqtt/runtime/sim"


def sim_extension(abi: str) -> Extension:
    tag = abi.replace(".", "")
    # One small wrapper source per layout (it defines RKLLM_SIM_ABI and includes rkllm_sim.c), so the two
    # builds never share an object file, even in a parallel build.
    return Extension(
        f"rkllm_mqtt.runtime.sim._librkllm_sim_{tag}",
        sources=[f"{SIM_DIR}/sim_abi{tag}.c"],
        depends=[f"{SIM_DIR}/rkllm_sim.c"],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-pthread"],
        extra_link_args=["-pthread"],
    )


def relay_extension() -> Extension:
    # The worker's token callback in C (rkllm_mqtt/runtime/relay/relay.c): loaded with cffi like the runtime.
    return Extension(
        "rkllm_mqtt.runtime.relay._librelay",
        sources=["rkllm_mqtt/runtime/relay/relay.c"],
        extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
    )


setup(ext_modules=[sim_extension("1.2"), sim_extension("1.3"), relay_extension()])
