"""Builtin formats (chatml, llama3, microlm): spans exact by construction, plus the Jinja source that
renders exactly the same text, for export.

Reasoning, tool calls and tools render in one documented way per format:
- chatml and microlm, as Qwen's templates do: reasoning as `<think>\\n…\\n</think>\\n\\n` before the
  content, each call as `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>` on its own line
  after it, and the record's `tools` in the system message after its text (`# Tools … <tools>…</tools>`).
- llama3, as Llama 3.1's JSON tool calling: each call as `{"name": …, "parameters": {…}}`, the tools
  (JSON, indent 4) before the system message's text. Reasoning as for chatml.
Tool results keep the format's own tool role (`<|im_start|>tool`, llama3's `ipython`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sft.protocol.templates.base import ChatTemplate
from sft.protocol.types import JSON_TEXT, ROLES, Message, RenderedChat, ToolCall

_QWEN_TOOLS = (
    "{system}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
_LLAMA_TOOLS = (
    "You have access to the following functions. To call a function, please respond with JSON for a "
    'function call.Respond in the format {"name": function name, "parameters": dictionary of argument '
    "names and its value}.Do not use variables.\n\n{tools}{system}"
)


@dataclass(frozen=True)
class BuiltinTemplate(ChatTemplate):
    """A format where every message is `header(role) + body + footer`; an assistant's body (reasoning,
    content, tool calls) and its footer through the eot are trained, so the span is exact by construction.
    Pattern fields hold `{placeholders}` filled by plain replacement (the text itself has braces)."""

    name: str
    special_tokens: list[str]
    eot: str
    header: str  # {role}
    footer: str
    assistant_footer: str  # must contain the eot; text after it is not trained
    bos: str = ""  # once at the start of the text
    role_names: tuple[tuple[str, str], ...] = ()  # our role → the role the format writes
    reasoning: str = "<think>\n{reasoning}\n</think>\n\n"  # before the content
    tool_call: str = '<tool_call>\n{"name": "{name}", "arguments": {arguments}}\n</tool_call>'
    tools_system: str = _QWEN_TOOLS  # the system message's text when the record has tools
    system_separator: str = "\n\n"  # after a non-empty system text in {system}
    tool_entry: str = "\n{tool}"  # one per tool in {tools}
    tool_indent: int | None = None  # JSON indent of a tool schema

    def _assistant_body(self, message: Message) -> str:
        """Reasoning, content, then one call per line (a newline before the first only after content)."""
        if message.reasoning is None and not message.tool_calls:
            return message.content
        reasoning = (
            "" if message.reasoning is None else self.reasoning.replace("{reasoning}", message.reasoning)
        )
        calls = [self._call_text(call) for call in message.tool_calls]
        return reasoning + "\n".join(([message.content] if message.content else []) + calls)

    def _call_text(self, call: ToolCall) -> str:
        arguments = call.arguments_json()
        return fill(self.tool_call, name=call.name, arguments=arguments)

    def _system_text(self, system: str, tools: list[Any]) -> str:
        entries = "".join(
            self.tool_entry.replace(
                "{tool}",
                JSON_TEXT.encode(tool)
                if self.tool_indent is None
                else json.dumps(tool, ensure_ascii=False, indent=self.tool_indent),
            )
            for tool in tools
        )
        system_text = system + self.system_separator if system else ""
        return fill(self.tools_system, tools=entries, system=system_text)

    def _with_tools(self, messages: list[Message], tools: list[Any] | None) -> list[Message]:
        """The tools join the system message (one is added when there is none)."""
        if not tools:
            return messages
        if messages and messages[0].role == "system":
            return [
                dataclasses.replace(messages[0], content=self._system_text(messages[0].content, tools))
            ] + (messages[1:])
        return [Message("system", self._system_text("", tools))] + messages

    def render(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> RenderedChat:
        headers, trained_footer = self._headers, self._trained_footer
        pieces, spans, length = [self.bos], [], len(self.bos)
        for message in self._with_tools(messages, tools):
            header = headers.get(message.role) or self._header(message.role)
            if message.role == "assistant":
                body, footer = self._assistant_body(message), self.assistant_footer
                if message.train:
                    start = length + len(header)
                    spans.append((start, start + len(body) + len(trained_footer)))
            else:
                body, footer = message.content, self.footer
            pieces += (header, body, footer)
            length += len(header) + len(body) + len(footer)
        if add_generation_prompt:  # a prompt: nothing in it is trained
            return RenderedChat("".join(pieces) + headers["assistant"], [])
        return RenderedChat("".join(pieces), spans)

    def _header(self, role: str) -> str:
        return self.header.format(role=dict(self.role_names).get(role, role))

    @cached_property
    def _headers(self) -> dict[str, str]:
        """Each role's header, made once (rendering is a hot loop)."""
        return {role: self._header(role) for role in ROLES}

    @cached_property
    def _trained_footer(self) -> str:
        """The assistant footer through the eot: what of it is trained."""
        return self.assistant_footer[: self.assistant_footer.index(self.eot) + len(self.eot)]

    def render_text(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        add_generation_prompt: bool = False,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        return self.render(messages, tools, add_generation_prompt).text

    def render_rows(
        self,
        messages: list[Message],
        tools: list[Any] | None = None,
        variables: Mapping[str, Any] | None = None,
        turns: str = "auto",
    ) -> list[RenderedChat]:
        """A builtin renders history as it renders a final turn, so one row is exact; `per_turn` gives
        each trained turn its own row (its conversation up to it, only it trained)."""
        if turns != "per_turn":
            return [self.render(messages, tools)]
        return [
            self.render(
                [
                    dataclasses.replace(m, train=False) if i != k else m
                    for i, m in enumerate(messages[: k + 1])
                ],
                tools,
            )
            for k, message in enumerate(messages)
            if message.role == "assistant" and message.train
        ]

    @property
    def fingerprint(self) -> str:
        return self.name


BUILTINS: dict[str, BuiltinTemplate] = {
    "chatml": BuiltinTemplate(
        name="chatml",
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eot="<|im_end|>",
        header="<|im_start|>{role}\n",
        footer="<|im_end|>\n",
        assistant_footer="<|im_end|>\n",
    ),
    "llama3": BuiltinTemplate(
        name="llama3",
        special_tokens=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eot="<|eot_id|>",
        header="<|start_header_id|>{role}<|end_header_id|>\n\n",
        footer="<|eot_id|>",
        assistant_footer="<|eot_id|>",
        bos="<|begin_of_text|>",
        role_names=(("tool", "ipython"),),  # as Meta's template writes tool results
        tool_call='{"name": "{name}", "parameters": {arguments}}',
        tools_system=_LLAMA_TOOLS,
        system_separator="",
        tool_entry="{tool}\n\n",
        tool_indent=4,
    ),
    "microlm": BuiltinTemplate(
        name="microlm",
        special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|endoftext|>"],
        eot="<|endoftext|>",
        header="<|{role}|>\n",
        footer="\n",
        assistant_footer="\n<|endoftext|>\n",
    ),
}


def fill(pattern: str, **values: str) -> str:
    """`pattern` with each `{key}` replaced by its value in one pass, so a value that holds `{key}` text
    (a function named "{arguments}") stays as written, as the exported Jinja template prints it."""
    return re.sub("{(" + "|".join(values) + ")}", lambda found: values[found.group(1)], pattern)


# ---- the same format as a Jinja chat template (what export ships) ------------------------------------


def jinja_literal(text: str) -> str:
    """A single-quoted Jinja string literal (escapes every Jinja engine understands: \\\\, \\', \\n)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _pattern(pattern: str, **values: str) -> str:
    """A pattern as a Jinja expression: literal pieces joined with the given expressions."""
    pieces, rest = [], pattern
    while rest:
        positions = [(rest.find("{" + key + "}"), key) for key in values if "{" + key + "}" in rest]
        if not positions:
            pieces.append(jinja_literal(rest))
            break
        position, key = min(positions)
        if position:
            pieces.append(jinja_literal(rest[:position]))
        pieces.append(f"({values[key]})")
        rest = rest[position + len(key) + 2 :]
    return " + ".join(pieces) or "''"


def builtin_jinja_source(template: BuiltinTemplate, generation_tags: bool = True) -> str:
    """A Jinja chat template that renders exactly what the builtin renders, for any messages, tools,
    reasoning and tool calls (in transformers' message schema).

    Only expressions and tags, no literal text between them: transformers' trim_blocks/lstrip_blocks have
    nothing to act on, so the text does not depend on the engine's whitespace settings.
    """
    role = "message['role']"
    for ours, theirs in template.role_names:  # e.g. llama3 writes a tool turn as ipython
        role = f"({jinja_literal(theirs)} if message['role'] == {jinja_literal(ours)} else {role})"
    header_start, header_end = template.header.split("{role}")
    eot_end = template.assistant_footer.index(template.eot) + len(template.eot)
    trained_footer, untrained_footer = (
        template.assistant_footer[:eot_end],
        template.assistant_footer[eot_end:],
    )
    opening, closing = ("{% generation %}", "{% endgeneration %}") if generation_tags else ("", "")
    indent = "" if template.tool_indent is None else f"indent={template.tool_indent}"
    tool_json = f"(tool | tojson({indent}))"
    arguments = "(call.arguments if call.arguments is string else call.arguments | tojson)"
    system_text = f"((system + {jinja_literal(template.system_separator)}) if system else '')"
    tools_system = _pattern(template.tools_system, system=system_text, tools="ns.tools")
    reasoning = "message['reasoning_content']"
    call_text = _pattern(template.tool_call, name="call.name", arguments=arguments)
    return "".join(
        [
            f"{{{{ {jinja_literal(template.bos)} }}}}" if template.bos else "",
            "{% set ns = namespace(tools='', body='') %}",
            "{% if tools %}{% for tool in tools %}",
            f"{{% set ns.tools = ns.tools + {_pattern(template.tool_entry, tool=tool_json)} %}}",
            "{% endfor %}",
            "{% if messages[0]['role'] != 'system' %}{% set system = '' %}",
            f"{{{{ {jinja_literal(template.header.format(role='system'))} + {tools_system}"
            f" + {jinja_literal(template.footer)} }}}}",
            "{% endif %}{% endif %}",
            "{% for message in messages %}",
            f"{{{{ {jinja_literal(header_start)} + {role} + {jinja_literal(header_end)} }}}}",
            "{% if message['role'] == 'assistant' %}",
            "{% set ns.body = '' %}",
            f"{{% if {reasoning} is defined and {reasoning} is not none %}}",
            f"{{% set ns.body = {_pattern(template.reasoning, reasoning=reasoning)} %}}",
            "{% endif %}",
            "{% set ns.body = ns.body + message['content'] %}",
            "{% if message['tool_calls'] is defined %}{% for tool_call in message['tool_calls'] %}",
            "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}",
            "{% if message['content'] or not loop.first %}{% set ns.body = ns.body + '\\n' %}{% endif %}",
            f"{{% set ns.body = ns.body + {call_text} %}}",
            "{% endfor %}{% endif %}",
            f"{opening}{{{{ ns.body + {jinja_literal(trained_footer)} }}}}{closing}",
            f"{{{{ {jinja_literal(untrained_footer)} }}}}" if untrained_footer else "",
            "{% elif message['role'] == 'system' and loop.first and tools %}",
            "{% set system = message['content'] %}",
            f"{{{{ {tools_system} + {jinja_literal(template.footer)} }}}}",
            "{% else %}",
            f"{{{{ message['content'] + {jinja_literal(template.footer)} }}}}",
            "{% endif %}",
            "{% endfor %}",
            "{% if add_generation_prompt %}",
            f"{{{{ {jinja_literal(template.header.format(role='assistant'))} }}}}",
            "{% endif %}",
        ]
    )
