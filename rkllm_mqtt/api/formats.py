"""Ollama's ``format``: an answer in JSON, or following a JSON schema.

The runtime cannot constrain sampling to a grammar, so the bridge does what it can and says the rest: the
instruction (and the schema) goes into the prompt, and the answer is checked. An answer that is not valid is
reported as an error, never handed on as if it were.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


class FormatError(ValueError):
    """The requested format cannot be used (a 400), or the answer does not follow it."""


@dataclass(frozen=True)
class AnswerFormat:
    schema: dict[str, Any] | None  # None: any JSON value

    @classmethod
    def from_request(cls, spec: str | dict[str, Any] | None) -> AnswerFormat | None:
        if spec is None or spec == "":
            return None
        if spec == "json":
            return cls(None)
        if isinstance(spec, dict):
            try:
                jsonschema.validators.validator_for(spec).check_schema(spec)
            except SchemaError as exc:
                raise FormatError(f"'format' is not a valid JSON schema: {exc.message}") from exc
            return cls(spec)
        raise FormatError("'format' must be \"json\" or a JSON schema object")

    def instruction(self) -> str:
        if self.schema is None:
            return "\n\nAnswer with JSON only: one valid JSON value, no other text."
        schema = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        return (
            "\n\nAnswer with JSON only: one JSON value that is valid against this JSON schema, no other text.\n"
            f"Schema: {schema}"
        )

    def check(self, answer: str) -> str:
        """The answer as clean JSON text; FormatError says what is wrong with it."""
        text = answer.strip()
        fenced = _FENCE.match(text)
        if fenced:  # small models like to wrap JSON in a Markdown fence
            text = fenced.group(1).strip()
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise FormatError(f"the model's answer is not valid JSON ({exc})") from exc
        if self.schema is not None:
            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(value)
            )
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                raise FormatError(f"the model's answer does not follow the schema at {where}: {error.message}")
        return text
