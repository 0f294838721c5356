"""maybe_add_system_prompt: give conversations without a system message the configured one.

Every decision is a pure function of (protocol.seed, example index) through blake2b — never Python's
salted hash() or global random state — so the same data and seed give the same store on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib

from sft.protocol.types import Conversation, Message, ProtocolConfig


def maybe_add_system_prompt(conversation: Conversation, config: ProtocolConfig, index: int) -> Conversation:
    """With probability `system_prompt_prob`, a copy of `conversation` led by a system message drawn from
    `system_prompt` (a string or a list). `index` is the example's stable position in the input, so the
    draw does not depend on batching. Conversations with a system message come back unchanged."""
    if config.system_prompt is None or any(message.role == "system" for message in conversation.messages):
        return conversation
    prompts = [config.system_prompt] if isinstance(config.system_prompt, str) else list(config.system_prompt)
    if not prompts or not all(isinstance(prompt, str) and prompt for prompt in prompts):
        raise ValueError(f"protocol.system_prompt={config.system_prompt!r}: expected non-empty strings")
    digest = hashlib.blake2b(f"{config.seed}:{index}".encode(), digest_size=16).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1): prob 1 always adds, 0 never
    if draw >= config.system_prompt_prob:
        return conversation
    prompt = prompts[int.from_bytes(digest[8:], "big") % len(prompts)]
    messages = [Message("system", prompt), *conversation.messages]
    return dataclasses.replace(conversation, messages=messages)  # keeps its variables, tools and place
