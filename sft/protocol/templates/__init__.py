"""render_chat_prompt: messages → the text a model sees, plus the character spans it learns to generate.

base.py (the interface) · builtin.py (chatml, llama3, microlm, and their Jinja source for export) ·
sandbox.py (the bounded Jinja environment) · jinja.py (any Hugging Face chat template) · turns.py
(inference-exact targets and rows) · files.py (loading) · probe.py (the start-up check).
"""

from sft.protocol.templates.base import TURNS, ChatTemplate, render_chat_prompt
from sft.protocol.templates.builtin import BUILTINS, BuiltinTemplate, builtin_jinja_source
from sft.protocol.templates.files import load_template, standalone_config
from sft.protocol.templates.jinja import JinjaTemplate
from sft.protocol.templates.probe import PROBE_TOOLS, check_template, probe_conversation, probe_messages

__all__ = [
    "BUILTINS",
    "PROBE_TOOLS",
    "TURNS",
    "BuiltinTemplate",
    "ChatTemplate",
    "JinjaTemplate",
    "builtin_jinja_source",
    "check_template",
    "load_template",
    "probe_conversation",
    "probe_messages",
    "render_chat_prompt",
    "standalone_config",
]
