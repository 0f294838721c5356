"""maybe_add_system_prompt: which conversations get a system prompt, and that the choice is reproducible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from sft.protocol.system import maybe_add_system_prompt
from sft.protocol.types import Conversation, Message, ProtocolConfig

CHAT = Conversation([Message("user", "q"), Message("assistant", "a")], source="d.jsonl", line=3, tools=[{}])


def drawn_prompts(config: ProtocolConfig, count: int) -> list[str | None]:
    """The system prompt each of `count` examples gets (None: none added)."""
    results = [maybe_add_system_prompt(CHAT, config, index) for index in range(count)]
    return [result.messages[0].content if result.messages[0].role == "system" else None for result in results]


def test_string_prompt_with_probability_one():
    result = maybe_add_system_prompt(CHAT, ProtocolConfig(system_prompt="Be kind."), index=0)
    assert result.messages == [Message("system", "Be kind."), *CHAT.messages]
    assert (result.source, result.line, result.tools) == ("d.jsonl", 3, [{}])
    assert len(CHAT.messages) == 2  # input not mutated


def test_an_added_prompt_keeps_the_records_variables_and_place():
    """`enable_thinking` from the record, a `record N` place and noted duplicate keys survive the prompt."""
    record = Conversation(
        [Message("user", "q"), Message("assistant", "a")],
        source="d.json",
        line=2,
        in_array=True,
        duplicate_keys=("role",),
        variables={"enable_thinking": False},
    )
    result = maybe_add_system_prompt(record, ProtocolConfig(system_prompt="Be kind."), index=0)
    assert result.messages[0] == Message("system", "Be kind.")
    assert (result.variables, result.where, result.duplicate_keys) == (
        {"enable_thinking": False},
        record.where,
        ("role",),
    )


def test_no_system_prompt_configured():
    assert maybe_add_system_prompt(CHAT, ProtocolConfig(), index=0) is CHAT


def test_existing_system_message_is_kept():
    chat = Conversation([Message("system", "Mine."), *CHAT.messages])
    assert maybe_add_system_prompt(chat, ProtocolConfig(system_prompt="Other."), index=0) is chat


def test_probability_zero_never_adds():
    assert drawn_prompts(ProtocolConfig(system_prompt="S", system_prompt_prob=0.0), 500) == [None] * 500


def test_probability_half_is_reproducible_and_about_half():
    config = ProtocolConfig(system_prompt="S", system_prompt_prob=0.5, seed=7)
    first = drawn_prompts(config, 1000)
    assert first == drawn_prompts(ProtocolConfig(system_prompt="S", system_prompt_prob=0.5, seed=7), 1000)
    assert 420 < first.count("S") < 580
    assert first != drawn_prompts(ProtocolConfig(system_prompt="S", system_prompt_prob=0.5, seed=8), 1000)


def test_list_draws_every_prompt_reproducibly():
    config = ProtocolConfig(system_prompt=["A", "B", "C"], seed=1)
    drawn = drawn_prompts(config, 600)
    assert drawn == drawn_prompts(config, 600)
    assert all(count > 150 for count in Counter(drawn).values()) and set(drawn) == {"A", "B", "C"}


def test_draws_are_pinned():
    """The draw is part of the store's contents: changing the hash would silently change cached data."""
    config = ProtocolConfig(system_prompt=["A", "B", "C"], system_prompt_prob=0.5, seed=0)
    assert drawn_prompts(config, 12) == [None, None, "A", None, "A", "A", "B", None, "B", "C", None, "C"]


def test_independent_of_python_hash_seed():
    config = ProtocolConfig(system_prompt=["A", "B", "C"], system_prompt_prob=0.5, seed=3)
    script = (
        "import json; from sft.protocol.system import maybe_add_system_prompt; "
        "from sft.protocol.types import Conversation, Message, ProtocolConfig; "
        "chat = Conversation([Message('user', 'q'), Message('assistant', 'a')]); "
        "config = ProtocolConfig(system_prompt=['A', 'B', 'C'], system_prompt_prob=0.5, seed=3); "
        "first = [maybe_add_system_prompt(chat, config, i).messages[0] for i in range(200)]; "
        "print(json.dumps([m.content if m.role == 'system' else None for m in first]))"
    )
    for hash_seed in ("1", "12345"):
        output = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(output) == drawn_prompts(config, 200)


@pytest.mark.parametrize("prompts", [[], ["A", ""], [""]])
def test_empty_prompts_are_a_config_error(prompts):
    with pytest.raises(ValueError, match="protocol.system_prompt"):
        maybe_add_system_prompt(CHAT, ProtocolConfig(system_prompt=prompts), index=0)
