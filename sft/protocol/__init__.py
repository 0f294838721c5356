"""The data protocol: conversations → (input_ids, labels). Pure Python (no torch, no Lightning).

records → normalize_conversations → maybe_add_system_prompt → render_chat_prompt → encode → build_loss_labels
"""

from sft.protocol.labels import build_loss_labels
from sft.protocol.normalize import normalize_conversations
from sft.protocol.system import maybe_add_system_prompt
from sft.protocol.templates import render_chat_prompt

__all__ = ["normalize_conversations", "maybe_add_system_prompt", "render_chat_prompt", "build_loss_labels"]
