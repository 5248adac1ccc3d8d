"""The error hierarchy. Every error carries one of the codes of the contract (docs/topics.md, "Error codes").

Errors are raised where they happen and converted to payloads only at the MQTT boundary,
so the code travels with the exception instead of being guessed from its text.
"""

from __future__ import annotations

from typing import Literal, get_args

ErrorCode = Literal[
    "invalid_json",
    "invalid_request",
    "prompt_too_long",
    "invalid_utf8",
    "queue_full",
    "unsupported",
    "forbidden_topic",
    "not_ready",
    "timeout",
    "aborted",
    "runtime_error",
    "runtime_crashed",
    "runtime_hung",
    "response_too_large",
]

ERROR_CODES: tuple[ErrorCode, ...] = get_args(ErrorCode)


class RkllmMqttError(Exception):
    """Base of every error the bridge reports to a client."""

    code: ErrorCode = "runtime_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RequestError(RkllmMqttError):
    """A request that cannot be accepted; ``code`` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConfigError(Exception):
    """The configuration cannot be used. The message names the key and the file."""


class RuntimeLoadError(RkllmMqttError):
    """The runtime cannot start: library, ABI, model or init failure. Never a crash of the daemon."""

    code: ErrorCode = "not_ready"


class AbiError(RuntimeLoadError):
    """The library's ABI layout is unknown, unsupported, or cannot be determined with certainty."""


class RuntimeCallError(RkllmMqttError):
    """A runtime function returned a non-zero code."""

    code: ErrorCode = "runtime_error"

    def __init__(self, function: str, ret: int, detail: str = "") -> None:
        text = f"{function} returned {ret}"
        if detail:
            text = f"{text}: {detail}"
        super().__init__(text)
        self.function = function
        self.ret = ret


def quote_input(value: str, limit: int = 64) -> str:
    """A client's string as an error message may show it: repr-quoted and cut to ``limit`` characters.

    repr escapes control characters, lone surrogates and non-characters, so the message stays valid UTF-8
    JSON whatever the client sent; the cut keeps a 64 KiB topic or field name from making a 64 KiB error.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
