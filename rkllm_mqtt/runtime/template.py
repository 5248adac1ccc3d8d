"""Chat template arguments for ``rkllm_set_chat_template``.

The runtime applies the model's own template until ``rkllm_set_chat_template`` is called, and the
call takes the system prompt already wrapped in the model's markup. When the user configured no
prefix/postfix we assume ChatML (Qwen, the family most RKLLM models belong to) and wrap the system
prompt ourselves; a configured template is passed through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

CHATML_PREFIX = "<|im_start|>user\n"
CHATML_POSTFIX = "<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class ChatTemplate:
    system_prompt: str
    prompt_prefix: str
    prompt_postfix: str


def build_template(system: str, prefix: str | None, postfix: str | None, *, markup: bool = True) -> ChatTemplate | None:
    """The template to set for ``system``, or None to leave the model's own template alone.

    ``markup`` is False for the simulated runtime, whose model has no template language.
    """
    if not system and prefix is None and postfix is None:
        return None
    if not markup:
        return ChatTemplate(system, prefix or "", postfix or "")
    if prefix is None and postfix is None:
        wrapped = system if not system or system.startswith("<|im_start|>") else _chatml_system(system)
        return ChatTemplate(wrapped, CHATML_PREFIX, CHATML_POSTFIX)
    return ChatTemplate(system, prefix or "", postfix or "")


def _chatml_system(system: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n"
