"""The benchmark suite of rkllm-mqtt: ``python -m bench [--quick]`` (see :mod:`bench.run`)."""
