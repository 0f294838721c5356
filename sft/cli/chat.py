"""sft-chat: talk to a checkpoint, with the tokenizer and template saved inside it.

    sft-chat ckpt=outputs/RUN/checkpoints/last.ckpt                          # a REPL: /tool, /reset, /exit
    sft-chat ckpt=... "system='You are Nova, a helpful assistant.'" prompt="Who are you?"   # one reply

(Hydra reads an unquoted comma as a list: quote such values for Hydra inside the shell's quotes.)

Each turn renders the whole conversation with the training template plus the generation prompt, tokenized
as one string exactly as in training, and decodes with the KV cache until a generation-stop token (which
is not printed). The reply is shown whole, reasoning included (GPT-OSS's channels as `[channel] text`
lines); the history keeps its reasoning and tool calls apart (sft/chat_reply.py), so later turns render
it the way the template renders history (Qwen3 and GPT-OSS drop reasoning, the builtins keep it).
`/tool TEXT` answers the model's last tool call with TEXT and lets it go on.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from sft.chat_reply import parse_reply
from sft.checkpoint import CheckpointError, InferenceBundle, load_for_inference, trained_system_prompt
from sft.cli.entry import run_cli
from sft.config import register_defaults
from sft.evaluate import generate_reply

COMMANDS = "/tool TEXT answers the last tool call, /reset starts a new conversation, /exit (or Ctrl-D) quits"


def resolve_device(device: str) -> str:
    """`auto`: the GPU when there is one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class ChatSession:
    """A conversation with one model: the system prompt, the turns so far, and the sampling settings."""

    bundle: InferenceBundle
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # messages in the records' schema

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation so far, as the next turn renders it (the user's new message follows)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + self.history

    def reset(self) -> None:
        self.history.clear()

    def respond(self, user_text: str) -> tuple[str, bool]:
        """(reply as shown, whether it ended with a generation-stop token); both turns join the history. A
        prompt that does not fit the model's context raises ValueError and leaves the history as it was."""
        return self._reply_to({"role": "user", "content": user_text})

    def answer_tool_call(self, result: str) -> tuple[str, bool]:
        """The model's reply to `result`, the output of its last tool call (ValueError when the last reply
        called none)."""
        last = self.history[-1] if self.history else {}
        if not last.get("tool_calls"):
            raise ValueError("the last reply called no tool")
        name = last["tool_calls"][-1]["function"]["name"]
        return self._reply_to({"role": "tool", "content": result, "name": name})

    def _reply_to(self, message: dict[str, Any]) -> tuple[str, bool]:
        messages = self.messages + [message]
        reply, stopped = generate_reply(
            self.bundle.model,
            messages,
            self.bundle.tokenizer,
            self.bundle.template,
            self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            generator=self.generator,
        )
        parsed = parse_reply(reply, self.bundle.template)  # history renders as the template renders it
        self.history += [message, parsed.message()]
        return parsed.shown, stopped


def terminal_lines(prompt: str = "you> ") -> Iterator[str]:
    """Lines typed at a terminal, with line editing, until Ctrl-D."""
    try:
        import readline  # noqa: F401  (importing it gives input() history and editing)
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return


def run_repl(session: ChatSession, lines: Iterable[str], out: TextIO = sys.stdout) -> None:
    """One reply per input line; `/tool TEXT` answers the last tool call, `/reset` clears the history,
    `/exit` ends. Notes go to stderr, so that stdout holds only the replies."""
    for line in lines:
        text = line.rstrip("\n")
        command = text.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            if command.split(maxsplit=1)[0] == "/tool":
                reply, stopped = session.answer_tool_call(command.removeprefix("/tool").strip())
            else:
                reply, stopped = session.respond(text)
        except ValueError as error:
            print(f"({error}; /reset to start a new conversation)", file=sys.stderr)
            continue
        print_reply(reply, stopped, session.max_new_tokens, out)


def print_reply(reply: str, stopped: bool, max_new_tokens: int, out: TextIO | None = None) -> None:
    """The reply on `out` (stdout); a reply that did not end with the end-of-turn token is flagged on
    stderr."""
    print(reply, file=out or sys.stdout, flush=True)
    if not stopped:
        print(f"(cut at max_new_tokens={max_new_tokens})", file=sys.stderr)


Text = str | int | float | bool | None  # Hydra reads `prompt=42` as a number: any scalar, used as text


@dataclass
class ChatConfig:
    """conf/chat.yaml."""

    ckpt: str  # an sft-train checkpoint (.ckpt); its tokenizer and template are inside
    prompt: Text = None  # one user message: print the reply and exit
    system: Text = None  # a system prompt for every conversation; None: the one training always added
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # for sampling (temperature > 0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected 0 < top_p <= 1")


register_defaults("sft_chat_defaults", ChatConfig)


def chat(config: ChatConfig) -> None:
    try:
        bundle = load_for_inference(config.ckpt, device=resolve_device(config.device))
    except CheckpointError as error:
        sys.exit(f"sft-chat: {error}")
    system = trained_system_prompt(bundle.section) if config.system is None else str(config.system)
    session = ChatSession(
        bundle,
        system=system,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )
    if config.prompt is not None:
        try:
            reply, stopped = session.respond(str(config.prompt))
        except ValueError as error:
            sys.exit(f"sft-chat: {error}")
        print_reply(reply, stopped, session.max_new_tokens)
        return
    if sys.stdin.isatty():
        print(f"chatting with {config.ckpt} ({bundle.template.name} template); {COMMANDS}", file=sys.stderr)
        run_repl(session, terminal_lines())
    else:
        run_repl(session, sys.stdin)


def main() -> None:
    run_cli("sft-chat", "chat", ChatConfig, lambda config, cfg: chat(config))


if __name__ == "__main__":
    main()
