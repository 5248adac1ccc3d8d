"""rkllm-mqtt: an MQTT bridge for Rockchip's RKLLM runtime."""

import sys

__all__ = ["__version__"]

__version__ = "0.1.0"

# structlog pretty-prints exceptions with rich whenever rich is importable, and amqtt's dependencies (typer)
# install it: importing it costs every process of the daemon ~5 MB of RSS and ~45 ms per start, for logs that
# are JSON lines or plain console text. None in sys.modules makes ``import rich`` fail, so structlog keeps
# plain tracebacks; setdefault leaves a rich that something imported earlier alone.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
