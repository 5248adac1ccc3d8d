"""The ``rkllm-mqtt`` command: serve, ask, doctor, check-config. Exit codes: :mod:`rkllm_mqtt.exit_codes`."""

# ruff: noqa: E402  (rich is kept out before structlog is imported, below)

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# structlog pretty-prints exceptions with rich whenever rich is importable, and amqtt's dependencies (typer)
# install it: importing it costs the daemon ~5 MB of RSS and ~45 ms per start, for logs that are JSON lines or
# plain console text. None in sys.modules makes ``import rich`` fail, so structlog (imported next) keeps plain
# tracebacks; setdefault leaves a rich that something imported earlier alone. Done here, in the command's entry
# module, so that importing the package itself changes nothing.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

import structlog

from rkllm_mqtt import __version__, exit_codes
from rkllm_mqtt.errors import ConfigError
from rkllm_mqtt.logs import configure_logging
from rkllm_mqtt.settings import DEFAULT_CONFIG_PATH, Settings, load_settings

log = structlog.get_logger("rkllm_mqtt")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH} when it exists)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkllm-mqtt", description="MQTT bridge for Rockchip's RKLLM runtime")
    parser.add_argument("--version", action="version", version=f"rkllm-mqtt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    _add_config(serve)

    ask = commands.add_parser("ask", help="send one prompt and stream the answer")
    ask.add_argument("prompt", help="the prompt; '-' reads it from standard input")
    _add_config(ask)
    ask.add_argument("--host", help="broker host (default: mqtt.host, or 127.0.0.1)")
    ask.add_argument("--port", type=int, help="broker port (default: mqtt.port)")
    ask.add_argument("--base", help="base topic (default: mqtt.base_topic)")
    ask.add_argument("--node", help="node id (default: mqtt.node_id)")
    ask.add_argument("--session", help="conversation id, to continue a conversation")
    ask.add_argument("--system", help="system prompt for this request")
    ask.add_argument("--max-new-tokens", type=int, help="cap on generated tokens")
    ask.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for the final answer, in all (default 300)"
    )
    ask.add_argument("--json", action="store_true", help="print the final response object instead of the text")

    doctor = commands.add_parser("doctor", help="check the board, runtime, model and broker")
    _add_config(doctor)

    check = commands.add_parser("check-config", help="validate the configuration and print it, secrets masked")
    _add_config(check)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, required=args.config is not None)


def _check_config(settings: Settings) -> int:
    # stdout is the JSON alone, so `rkllm-mqtt check-config | jq` works; where it came from goes to stderr.
    source = str(settings.source_file) if settings.source_file else "(no file: defaults and environment)"
    print(f"# configuration from {source}", file=sys.stderr)
    print(json.dumps(settings.masked(), indent=2, sort_keys=False))
    return exit_codes.OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and argv is None:  # started as a program, not called from Python
        from rkllm_mqtt.allocator import use_c_heap

        use_c_heap()
    try:
        settings = _load(args)
    except ConfigError as exc:
        print(f"rkllm-mqtt: {exc}", file=sys.stderr)
        return exit_codes.CONFIG
    configure_logging(settings.logging.level, settings.logging.format)

    if args.command == "check-config":
        return _check_config(settings)
    if args.command == "serve":
        from rkllm_mqtt.daemon import serve

        return serve(settings)
    if args.command == "ask":
        from rkllm_mqtt.ask import ask

        return ask(settings, args)
    if args.command == "doctor":
        from rkllm_mqtt.doctor import doctor

        return doctor(settings)
    return exit_codes.CONFIG  # unreachable: argparse requires a known command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
