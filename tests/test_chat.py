"""sft-chat: one-shot replies, stopping at the end-of-turn token (never printed), /reset and /exit, and
history rendered exactly as training renders the same conversation."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft.checkpoint import load_for_inference
from sft.cli import chat as chat_cli
from sft.cli.chat import ChatSession, run_repl
from sft.evaluate import prompt_ids
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import Accounting, ConversationEncoder
from sft.protocol.types import Conversation, Message, ProtocolConfig
from tests.helpers import steered_checkpoint, write_checkpoint

SYSTEM, QUESTION = "You are Nova", "Who are you?"


@pytest.fixture(scope="module")
def steered(tmp_path_factory, tokenizer):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    return steered_checkpoint(tmp_path_factory.mktemp("chat") / "steered.ckpt", tokenizer, messages)


def test_one_shot_prints_only_the_reply_and_writes_nothing(steered, tokenizer, tmp_path):
    checkpoint, reply_ids = steered
    command = [
        str(Path(sys.executable).with_name("sft-chat")),
        f"ckpt={checkpoint}",
        f"system={SYSTEM}",
        f"prompt={QUESTION}",
        "max_new_tokens=20",
        "device=cpu",
    ]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8") == tokenizer.decode(reply_ids, skip_special_tokens=False) + "\n"
    assert "<|im_end|>" not in result.stdout.decode("utf-8")
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file


def test_generation_stops_at_the_end_of_turn_token(steered, tokenizer):
    checkpoint, reply_ids = steered
    session = ChatSession(load_for_inference(checkpoint), system=SYSTEM, max_new_tokens=20)
    reply, stopped = session.respond(QUESTION)
    assert stopped
    assert reply == tokenizer.decode(reply_ids, skip_special_tokens=False)
    assert "<|im_end|>" not in reply
    assert session.history == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply}]


def test_repl_keeps_history_resets_and_exits(steered, tokenizer):
    checkpoint, reply_ids = steered
    session = ChatSession(load_for_inference(checkpoint), system=SYSTEM, max_new_tokens=8)
    out = io.StringIO()
    run_repl(
        session, [f"{QUESTION}\n", "Sort: 3 1 2\n", "/reset\n", f"{QUESTION}\n", "/exit\n", "unread\n"], out
    )
    replies = out.getvalue().splitlines()
    expected = tokenizer.decode(reply_ids, skip_special_tokens=False)
    assert replies[0] == expected and replies[-1] == expected  # after /reset: the same prompt again
    assert [m["content"] for m in session.history] == [QUESTION, expected]  # "unread" never ran


def test_a_prompt_longer_than_the_context_is_refused_and_not_kept(steered):
    checkpoint, _ = steered
    session = ChatSession(load_for_inference(checkpoint), max_new_tokens=4)
    out = io.StringIO()
    run_repl(session, ["word " * 300, QUESTION], out)
    assert len(out.getvalue().splitlines()) == 1  # only the second line got a reply
    assert [m["content"] for m in session.history][0] == QUESTION


@pytest.mark.parametrize("template", ["chatml", "llama3", "microlm"])
def test_history_renders_as_training_renders_the_conversation(tmp_path, tokenizer, template):
    session = ChatSession(load_for_inference(write_checkpoint(tmp_path / "c.ckpt", tokenizer, template)))
    session.system = "You are Sage, a helpful assistant."
    session.history = [
        {"role": "user", "content": "Reverse: 3 8 1"},
        {"role": "assistant", "content": "1 8 3"},
        {"role": "user", "content": "Now sort my list."},
        {"role": "assistant", "content": "1 3 8"},
    ]
    question = {"role": "user", "content": "How many items were in my list?"}
    prompt = prompt_ids(session.messages + [question], session.bundle.tokenizer, session.bundle.template)

    conversation = session.messages + [question, {"role": "assistant", "content": "3"}]
    encoder = ConversationEncoder(session.bundle.tokenizer, session.bundle.template, ProtocolConfig())
    messages = [Message(m["role"], m["content"]) for m in conversation]
    (example,) = encoder.encode_conversations([Conversation(messages)], Accounting())
    assert example.input_ids[: len(prompt)].tolist() == prompt
    # The prompt ends exactly where the last answer's trained tokens begin.
    assert example.labels[len(prompt) - 1] == IGNORE_INDEX
    assert example.labels[len(prompt)] != IGNORE_INDEX


def test_a_reply_keeps_its_reasoning_apart_so_history_renders_as_the_template_renders_it(
    monkeypatch, tokenizer
):
    """The reply is shown whole; the next turn renders it through the template, which keeps the reasoning
    (builtin chatml) or drops it from history (a Qwen3-style template), as it did in training."""
    import sft.cli.chat as chat_cli
    from sft.chat_reply import split_reasoning
    from sft.checkpoint import InferenceBundle
    from sft.protocol.templates import BUILTINS, JinjaTemplate

    assert split_reasoning("<think>\nWhy.\n</think>\n\nBecause.") == ("Why.", "Because.")
    assert split_reasoning("Why.\n</think>\n\nBecause.") == ("Why.", "Because.")  # <think> prefilled
    assert split_reasoning("Because.") == (None, "Because.")
    monkeypatch.setattr(
        chat_cli, "generate_reply", lambda *args, **kwargs: ("<think>\nWhy.\n</think>\n\nBecause.", True)
    )
    strips_history = JinjaTemplate(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content and loop.last %}"
        "<think>\n{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        eot="<|im_end|>",
    )
    for template, kept in ((BUILTINS["chatml"], True), (strips_history, False)):
        session = ChatSession(InferenceBundle(None, tokenizer, template, {}, {}, {}))
        assert session.respond("Why?") == ("<think>\nWhy.\n</think>\n\nBecause.", True)
        assert session.history[-1] == {"role": "assistant", "content": "Because.", "reasoning": "Why."}
        text = tokenizer.decode(
            prompt_ids(session.messages + [{"role": "user", "content": "More?"}], tokenizer, template),
            skip_special_tokens=False,
        )
        assert ("<think>\nWhy.\n</think>\n\nBecause." in text) == kept and "Because.<|im_end|>" in text


def chat_config(checkpoint, **settings) -> chat_cli.ChatConfig:
    return chat_cli.ChatConfig(**{"ckpt": str(checkpoint), "device": "cpu", "max_new_tokens": 20, **settings})


def test_one_shot_flags_a_reply_cut_at_max_new_tokens(steered, capsys):
    checkpoint, reply_ids = steered
    chat_cli.chat(chat_config(checkpoint, system=SYSTEM, prompt=QUESTION, max_new_tokens=len(reply_ids)))
    assert capsys.readouterr().err == f"(cut at max_new_tokens={len(reply_ids)})\n"
    chat_cli.chat(chat_config(checkpoint, system=SYSTEM, prompt=QUESTION))
    assert capsys.readouterr().err == ""


def test_the_system_prompt_defaults_to_the_one_training_always_added(steered, tokenizer, tmp_path, capsys):
    checkpoint, reply_ids = steered
    saved = torch.load(checkpoint, weights_only=True)
    saved["sft"]["protocol"] = {"system_prompt": SYSTEM, "system_prompt_prob": 1.0}
    torch.save(saved, tmp_path / "with_protocol.ckpt")
    chat_cli.chat(chat_config(tmp_path / "with_protocol.ckpt", prompt=QUESTION))
    assert capsys.readouterr().out == tokenizer.decode(reply_ids, skip_special_tokens=False) + "\n"
