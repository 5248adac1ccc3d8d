"""``doctor``'s look at the Ollama API: is it on, where does it listen, is the port free or already served."""

from __future__ import annotations

import errno
import json
import socket
import urllib.error
import urllib.request

from rkllm_mqtt.doctor import CheckResult
from rkllm_mqtt.settings import Settings

PROBE_TIMEOUT_S = 2.0


def _bind_problem(host: str, port: int) -> OSError | None:
    """None when ``host:port`` can be listened on now; the error otherwise."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        return exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc
    return None


def _who_serves(host: str, port: int) -> str | None:
    """The server that answers Ollama's ``GET /api/version`` there: "rkllm-mqtt", "other", or None (nothing)."""
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{target}]" if ":" in target else target
    try:
        with urllib.request.urlopen(f"http://{shown}:{port}/api/version", timeout=PROBE_TIMEOUT_S) as reply:
            json.loads(reply.read().decode("utf-8"))
            server = reply.headers.get("Server", "")
    except urllib.error.HTTPError as exc:  # it speaks HTTP; a 401 is this bridge with a token
        server = exc.headers.get("Server", "") if exc.headers else ""
    except (OSError, ValueError):
        return None
    return "rkllm-mqtt" if server.startswith("rkllm-mqtt") else "other"


def check_api(settings: Settings) -> CheckResult:
    name = "Ollama API"
    api = settings.api
    if not api.enabled:
        return CheckResult(name, "SKIP", "off (api.enabled = false)")
    where = f"{api.host}:{api.port}"
    exposed = not api.loopback_only
    problem = _bind_problem(api.host, api.port)
    if problem is not None and problem.errno not in (errno.EADDRINUSE, errno.EACCES):
        return CheckResult(
            name, "FAIL", f"cannot listen on {where}: {problem}", "set api.host to an address of this machine"
        )
    if problem is not None and problem.errno == errno.EACCES:
        return CheckResult(name, "FAIL", f"port {api.port} needs privileges", "use a port above 1023 (11434)")
    if problem is not None:
        serving = _who_serves(api.host, api.port)
        if serving == "rkllm-mqtt":
            detail = f"{where}: a running rkllm-mqtt answers there (reachable)"
        else:
            what = "another Ollama-compatible server (Ollama itself?)" if serving == "other" else "another program"
            return CheckResult(
                name, "FAIL", f"{where} is taken by {what}: serve cannot start", "stop it or set api.port"
            )
    else:
        detail = f"{where}: the port is free; serve will listen there"
    if exposed:
        token = "with a bearer token" if api.token is not None else "WITHOUT a token"
        return CheckResult(
            name,
            "WARN",
            f"{detail}; open to the network {token}: whoever reaches it can use the NPU",
            "bind api.host to 127.0.0.1, or firewall the port"
            + ("" if api.token is not None else ", or set api.token"),
        )
    return CheckResult(name, "PASS", f"{detail}; this machine only (loopback)")
