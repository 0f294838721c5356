"""The embedded sample data: deterministic, split-disjoint, every answer right by an independent check."""

from __future__ import annotations

import json
import re

import pytest

from sft.data.sample import evaluation_items, exact_match, generate_conversations

LIST = re.compile(r"(?<![\w'])((?:[0-9a-z] ){2,4}[0-9a-z])(?![\w'])")
UNITS = {"meter": 100, "kilometer": 1000, "hour": 60, "day": 24, "week": 7}
LIST_OPS = {
    "reverse": lambda items: " ".join(items[::-1]),
    "sort": lambda items: " ".join(sorted(items)),
    "first": lambda items: items[0],
    "last": lambda items: items[-1],
    "length": lambda items: str(len(items)),
}


def _parse(question: str) -> tuple:
    """The task as (skill, *arguments), read back from the question's text alone."""
    if match := LIST.search(question):
        op = "sort" if re.search(r"\b(sort|order)\b", question, re.I) else "reverse"
        return ("list", op, match.group(1).split())
    if "my list" in question or "list I gave" in question:
        words = {"first": "first", "last": "last", "how many": "length", "how long": "length", "sort": "sort"}
        return ("follow", next((op for word, op in words.items() if word in question.lower()), "reverse"))
    if "letter" in question or "the word" in question:
        letter = re.search(r"(?:letter|does) (\w) ", question).group(1)
        return ("count", letter, re.search(r"\b(?:in|word) (\w+)[?.,]", question).group(1))
    if match := re.search(r"(\d) (kilometer|meter|hour|day|week)s?\b", question):
        return ("convert", match.group(2), int(match.group(1)))
    if match := re.search(r"(\d) (?:\+|plus|and) (\d)", question):
        return ("add", int(match.group(1)), int(match.group(2)))
    if match := re.search(r"(?:Double|double|twice) (\d)", question):
        return ("double", int(match.group(1)))
    assert re.search(r"\b(you|your)\b", question), f"no skill recognised in {question!r}"
    return ("identity",)


def _check_answers(record: dict) -> tuple:
    """Assert every answer against one recomputed from the questions; return the conversation's task key."""
    system, *turns = record["messages"]
    name = re.fullmatch(r"You are (\w+), a helpful assistant\.", system["content"]).group(1)
    key: list = [name]
    user_list = None  # the list a follow-up may refer to: only the one of the turn right before
    for question, answer in zip(turns[::2], turns[1::2]):
        task = _parse(question["content"])
        if task[0] == "list":
            user_list = task[2]
        if task[0] in ("list", "follow"):
            assert user_list is not None, f"follow-up without a list right before it: {record}"
            expected = LIST_OPS[task[1]](user_list)
        else:
            user_list = None
            skill, *args = task
            expected = {
                "count": lambda: str(args[-1].count(args[0])),
                "convert": lambda: str(args[1] * UNITS[args[0]]),
                "add": lambda: str(sum(args)),
                "double": lambda: str(2 * args[0]),
                "identity": lambda: f"I am {name}.",
            }[skill]()
        assert answer["content"] == expected, (question["content"], record)
        key.append(repr(task))
    return tuple(key)


def test_same_seed_same_records_and_longer_runs_extend_shorter_ones():
    records = generate_conversations(200, seed=3)
    assert records == generate_conversations(200, seed=3)
    assert generate_conversations(50, seed=3) == records[:50]
    assert generate_conversations(200, seed=4) != records
    assert generate_conversations(50, seed=3, split="val") != generate_conversations(50, seed=3, split="test")


def test_shape_system_first_then_alternating_turns_with_at_least_two_answers():
    for record in generate_conversations(300, seed=0):
        roles = [message["role"] for message in record["messages"]]
        assert roles[0] == "system"
        assert roles[1:] == ["user", "assistant"] * (len(roles) // 2)
        assert 2 <= roles.count("assistant") <= 4
        assert all(message["content"] == message["content"].strip() != "" for message in record["messages"])
    json.dumps(record)  # plain JSON, ready for a JSONL file


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_answer_matches_an_independent_recomputation(split):
    records = generate_conversations(400, seed=1, split=split)
    for record in records:
        _check_answers(record)
    questions = [message["content"] for record in records for message in record["messages"][1::2]]
    follow_ups = sum(_parse(question)[0] == "follow" for question in questions)
    assert follow_ups > 50  # follow-ups are a real share of the data, not a rare case


def test_held_out_splits_share_no_task_with_train_whatever_the_wording():
    def keys(split: str, count: int, seed: int = 0) -> set[tuple]:
        return {_check_answers(record) for record in generate_conversations(count, seed, split)}

    train = keys("train", 5000)
    assert train & keys("train", 1000, seed=1)  # control: the key space is small enough to show overlap
    val, test = keys("val", 1000), keys("test", 1000)
    assert not train & val and not train & test and not val & test


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split="):
        generate_conversations(1, seed=0, split="validation")


def test_evaluation_items_one_per_assistant_turn_prompt_ends_with_its_user_turn():
    records = generate_conversations(100, seed=2, split="test")
    items = evaluation_items(records)
    assert len(items) == sum(m["role"] == "assistant" for r in records for m in r["messages"])
    position = 0
    for record in records:
        for index, message in enumerate(record["messages"]):
            if message["role"] == "assistant":
                prompt, expected = items[position]
                assert prompt == record["messages"][:index] and prompt[-1]["role"] == "user"
                assert expected == message["content"]
                position += 1
    items[0][0][0]["content"] = "changed"
    assert records[0]["messages"][0]["content"] != "changed"  # prompts are copies


def test_exact_match_strips_whitespace_and_nothing_else():
    assert exact_match(" 1 8 3\n", "1 8 3")
    assert exact_match("I am Nova.", " I am Nova. ")
    assert not exact_match("1 8 3.", "1 8 3")
    assert not exact_match("1  8 3", "1 8 3")
    assert not exact_match("i am nova.", "I am Nova.")
    assert not exact_match("", "0")
