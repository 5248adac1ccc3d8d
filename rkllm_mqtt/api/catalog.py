"""The one loaded model, described the way Ollama describes its models (tags, ps, show)."""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime, timezone
from typing import Any

from rkllm_mqtt.payloads import ModelInfo

_SIZE_RE = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
_QUANT_RE = re.compile(r"(w\d+a\d+(?:_g\d+)?)", re.IGNORECASE)
_FAMILY_RE = re.compile(r"^([a-zA-Z]+(?:\d+(?:\.\d+)?)?)")
# Ollama shows a model that stays loaded with an expiry far in the future.
_NEVER = "2318-01-01T00:00:00Z"
CAPABILITIES = ["completion", "tools", "thinking"]


def ollama_name(model_name: str) -> str:
    """Ollama names carry a tag; a name without one is ``:latest``."""
    return model_name if ":" in model_name else f"{model_name}:latest"


def matches(requested: str, model_name: str) -> bool:
    """Whether a request's model names the loaded model (with or without its tag, any case)."""
    wanted = requested.strip().lower()
    full = ollama_name(model_name).lower()
    return wanted in (full, model_name.lower()) or (":" not in wanted and f"{wanted}:latest" == full)


def iso_time(ts: float) -> str:
    """A Unix time as Ollama writes times: ISO 8601 in UTC, with ``Z``."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _file_facts(path: str) -> tuple[int, float | None]:
    try:
        stat = os.stat(path)
    except OSError:
        return 0, None
    return stat.st_size, stat.st_mtime


def details(info: ModelInfo) -> dict[str, Any]:
    name = info.model_name
    family_match = _FAMILY_RE.match(name)
    family = family_match.group(1).lower() if family_match else "rkllm"
    size = _SIZE_RE.search(name)
    quant = _QUANT_RE.search(name)
    return {
        "parent_model": "",
        "format": "rkllm",
        "family": family,
        "families": [family],
        "parameter_size": f"{size.group(1)}B" if size else "",
        "quantization_level": quant.group(1).upper() if quant else "",
    }


def _identity(info: ModelInfo) -> dict[str, Any]:
    size, mtime = _file_facts(info.model_path)
    # A digest of the file's identity (path, size, time), not of its gigabytes: cheap and stable while it is unchanged.
    digest = hashlib.sha256(f"{info.model_path}\0{size}\0{mtime}".encode()).hexdigest()
    name = ollama_name(info.model_name)
    return {
        "name": name,
        "model": name,
        "modified_at": iso_time(mtime if mtime is not None else info.loaded_at),
        "size": size,
        "digest": digest,
        "details": details(info),
    }


def tags(info: ModelInfo | None) -> dict[str, Any]:
    return {"models": [_identity(info)] if info is not None else []}


def running(info: ModelInfo | None, ready: bool) -> dict[str, Any]:
    if info is None or not ready:
        return {"models": []}
    entry = _identity(info)
    del entry["modified_at"]
    entry.update(expires_at=_NEVER, size_vram=entry["size"], context_length=info.max_context_len)
    return {"models": [entry]}


def show(info: ModelInfo, template: str) -> dict[str, Any]:
    entry = _identity(info)
    family = entry["details"]["family"]
    parameters = "\n".join(
        f"{key} {value}"
        for key, value in (
            ("num_ctx", info.max_context_len),
            ("num_predict", info.max_new_tokens),
            ("temperature", info.temperature),
            ("top_k", info.top_k),
            ("top_p", info.top_p),
            ("repeat_penalty", info.repeat_penalty),
        )
    )
    return {
        "license": "",
        "modelfile": f"# Served by rkllm-mqtt on the NPU (RKLLM runtime, ABI {info.abi})\nFROM {info.model_path}\n",
        "parameters": parameters,
        "template": template,
        "details": entry["details"],
        "model_info": {
            "general.architecture": family,
            "general.basename": info.model_name,
            f"{family}.context_length": info.max_context_len,
            "rkllm.abi": info.abi,
            "rkllm.runtime_version": info.runtime_version,
            "rkllm.library": info.library,
        },
        "capabilities": CAPABILITIES,
        "modified_at": entry["modified_at"],
    }
