"""Exit codes of the ``rkllm-mqtt`` command: one meaning each, the same in every subcommand.

docs/cli.md shows this table; a test keeps the two in step.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0
# 1 is what Python exits with on an uncaught exception: a bug, reported with its traceback. No code path uses it.
INTERNAL_ERROR: Final = 1
CONFIG: Final = 2  # usage or configuration error (argparse also exits 2 on bad arguments)
BROKER_UNREACHABLE: Final = 3
EMBEDDED_BROKER_FAILED: Final = 4
REQUEST_FAILED: Final = 5
NO_ANSWER: Final = 6
NODE_OFFLINE: Final = 7
CHECK_FAILED: Final = 8
API_FAILED: Final = 9
# 128 + SIGPIPE: what a shell reports for any command that writes into a pipe whose reader has gone (`| head`).
OUTPUT_CLOSED: Final = 141

MEANINGS: Final[dict[int, str]] = {
    OK: "success",
    INTERNAL_ERROR: "unexpected internal error (a bug; the traceback says where)",
    CONFIG: "usage or configuration error: bad arguments, an invalid setting or variable, an unreadable file",
    BROKER_UNREACHABLE: "the MQTT broker cannot be reached, or refuses the connection or the login",
    EMBEDDED_BROKER_FAILED: "the embedded broker cannot start (most often: its port is taken)",
    REQUEST_FAILED: "the bridge answered the request with an error (state error, aborted or timeout)",
    NO_ANSWER: "no final answer within --timeout",
    NODE_OFFLINE: "the node is offline, or unknown on this broker",
    CHECK_FAILED: "at least one check FAILed",
    API_FAILED: "the Ollama API cannot listen (most often: its port is taken)",
    OUTPUT_CLOSED: (
        "standard output was closed before the answer was written "
        "(a reader such as head stopped reading; 128 + SIGPIPE, as shells report it)"
    ),
}
