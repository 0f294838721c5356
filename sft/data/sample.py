"""The embedded default data set (`data=sample`): generated chat conversations that a tiny model can learn.

Each conversation has a system prompt "You are {Name}, a helpful assistant." and 2-4 user/assistant
turns drawn from a few small skills:

- reverse or sort a list of 3-5 distinct single digits or letters ("Reverse: 3 8 1" -> "1 8 3");
- follow-ups on the list of the turn before ("Now sort my list.", "What was the last item in my list?");
  they always refer to the list the user gave, never to the assistant's rearrangement of it;
- count a letter in a word from a small vocabulary ("... the letter p in apple?" -> "2");
- unit conversions and sums with single-digit operands ("How many minutes are in 3 hours?" -> "180");
- identity ("Who are you?" -> "I am Nova."), copying the name from the system prompt.

Why a ~1M-parameter model learns these in a few minutes of CPU training: every answer is short and
canonical (wording varies only in the questions); reversing, sorting, picking an item and the
identity are copying problems that attention solves (induction heads over one-token items); the
counts, conversions and sums are a few hundred facts seen thousands of times each. So greedy exact
match on held-out conversations is a meaningful, reachable target.

Generation is deterministic in (seed, split, index). The held-out splits ("val", "test") are disjoint
from "train" by what is asked, not only by wording: a conversation's key is its name and its turns'
(skill, arguments), and a stable hash of that key assigns it to exactly one split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from typing import NamedTuple

NAMES = ("Nova", "Orion", "Echo", "Pixel", "Sage", "Atlas", "Luna", "Milo", "Iris", "Felix", "Juno", "Zara")
LIST_POOLS = ("0123456789", "abcdefgh")
WORDS = (
    "apple", "banana", "cherry", "letter", "bottle", "coffee", "pepper", "summer", "rabbit", "little",
    "yellow", "balloon", "tomato", "potato", "window", "garden", "paper", "kitten", "puppy", "mirror",
)  # fmt: skip
CONVERSIONS = (  # (from unit, to unit, factor): answers are a lookup of nine facts each
    ("meter", "centimeter", 100),
    ("kilometer", "meter", 1000),
    ("hour", "minute", 60),
    ("day", "hour", 24),
    ("week", "day", 7),
)
SPLIT_BUCKETS = {"val": 0, "test": 1}  # hash buckets out of 10; every other bucket is "train"

ASK_LIST = {
    "reverse": ("Reverse: {}", "Reverse this list: {}", "Can you reverse {}?", "Please reverse the list {}."),
    "sort": ("Sort: {}", "Sort this list: {}", "Can you sort {}?", "Please put {} in order."),
}
LIST_ANSWERS = {  # always computed from the list the user gave
    "reverse": lambda items: " ".join(reversed(items)),
    "sort": lambda items: " ".join(sorted(items)),
    "first": lambda items: items[0],
    "last": lambda items: items[-1],
    "length": lambda items: str(len(items)),
}
ASK_FOLLOW_UP = {  # "my list" so that "last" cannot mean the last item of the assistant's answer
    "reverse": ("Now reverse my list.", "Reverse the list I gave you."),
    "sort": ("Now sort my list.", "Sort the list I gave you."),
    "first": ("What was the first item in my list?", "Which item came first in the list I gave you?"),
    "last": ("What was the last item in my list?", "Which item came last in the list I gave you?"),
    "length": ("How many items were in my list?", "How long was the list I gave you?"),
}
ASK_COUNT = (
    "How many times does the letter {letter} appear in {word}?",
    "Count the letter {letter} in {word}.",
    "In the word {word}, how many times does {letter} appear?",
)
ASK_CONVERT = ("How many {to}s are in {amount}?", "Convert {amount} to {to}s.", "{amount} is how many {to}s?")
ASK_ADD = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.")
ASK_DOUBLE = ("Double {a}.", "What is double {a}?", "What is twice {a}?")
ASK_IDENTITY = ("Who are you?", "What is your name?", "What should I call you?", "Tell me your name.")


class _Turn(NamedTuple):
    key: tuple  # what was asked, without its wording: the unit of train/held-out disjointness
    question: str
    answer: str
    items: tuple[str, ...] | None = None  # the user's list this turn is about, for follow-ups


def _list_task(rng: random.Random, name: str) -> _Turn:
    op = rng.choice(tuple(ASK_LIST))
    items = tuple(rng.sample(rng.choice(LIST_POOLS), rng.randint(3, 5)))  # distinct: one right order
    question = rng.choice(ASK_LIST[op]).format(" ".join(items))
    return _Turn((op, items), question, LIST_ANSWERS[op](items), items)


def _follow_up(rng: random.Random, previous: _Turn) -> _Turn:
    op = rng.choice([op for op in ASK_FOLLOW_UP if op != previous.key[0]])  # never re-ask the same thing
    return _Turn((op,), rng.choice(ASK_FOLLOW_UP[op]), LIST_ANSWERS[op](previous.items), previous.items)


def _count_letter(rng: random.Random, name: str) -> _Turn:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)) if rng.random() < 0.75 else "aeiou")  # some answers are 0
    question = rng.choice(ASK_COUNT).format(letter=letter, word=word)
    return _Turn(("count", letter, word), question, str(word.count(letter)))


def _convert(rng: random.Random, name: str) -> _Turn:
    unit, to, factor = rng.choice(CONVERSIONS)
    number = rng.randint(1, 9)
    amount = f"{number} {unit}" + ("s" if number > 1 else "")
    question = rng.choice(ASK_CONVERT).format(amount=amount, to=to)
    return _Turn(("convert", unit, number), question, str(number * factor))


def _arithmetic(rng: random.Random, name: str) -> _Turn:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return _Turn(("double", a), rng.choice(ASK_DOUBLE).format(a=a), str(2 * a))
    return _Turn(("add", a, b), rng.choice(ASK_ADD).format(a=a, b=b), str(a + b))


def _identity(rng: random.Random, name: str) -> _Turn:
    return _Turn(("identity",), rng.choice(ASK_IDENTITY), f"I am {name}.")


# Lists weigh twice (reverse and sort share a generator) because follow-ups hang off them.
FRESH_TASKS: tuple[Callable[[random.Random, str], _Turn], ...] = (
    _list_task, _list_task, _count_letter, _convert, _arithmetic, _identity,
)  # fmt: skip


def _conversation(rng: random.Random) -> tuple[tuple, list[dict]]:
    """One conversation and its key; a follow-up comes only right after a turn about a list."""
    name = rng.choice(NAMES)
    messages = [{"role": "system", "content": f"You are {name}, a helpful assistant."}]
    key: list = [name]
    previous: _Turn | None = None
    for _ in range(rng.randint(2, 4)):
        if previous is not None and previous.items is not None and rng.random() < 0.6:
            turn = _follow_up(rng, previous)
        else:
            turn = rng.choice(FRESH_TASKS)(rng, name)
        messages.append({"role": "user", "content": turn.question})
        messages.append({"role": "assistant", "content": turn.answer})
        key.append(turn.key)
        previous = turn
    return tuple(key), messages


def _split_of(key: tuple) -> str:
    """A stable hash (never Python's salted hash()) so the partition is the same in every process."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 10
    return next((split for split, held_out in SPLIT_BUCKETS.items() if held_out == bucket), "train")


def generate_conversations(count: int, seed: int, split: str = "train") -> list[dict]:
    """`count` records `{"messages": [...]}`; record i depends only on (seed, split, i), so a longer
    run extends a shorter one. Conversations are redrawn until their key falls in `split`."""
    if split not in ("train", *SPLIT_BUCKETS):
        raise ValueError(f"split={split!r}: expected 'train', 'val' or 'test'")
    if count < 0:
        raise ValueError(f"count={count}: expected >= 0")
    records = []
    for index in range(count):
        rng = random.Random(f"{seed}:{split}:{index}")  # string seeds are stable across processes
        while True:
            key, messages = _conversation(rng)
            if _split_of(key) == split:
                break
        records.append({"messages": messages})
    return records


def evaluation_items(conversations: Iterable[dict]) -> list[tuple[list[dict], str]]:
    """One (prompt messages ending with a user turn, expected answer) pair per assistant turn; the
    prompt holds the reference answers of earlier turns, as in training."""
    items = []
    for record in conversations:
        messages = record["messages"]
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                items.append(([dict(m) for m in messages[:index]], message["content"]))
    return items


def exact_match(prediction: str, expected: str) -> bool:
    """Equal after stripping surrounding whitespace; anything fuzzier would hide wrong answers."""
    return prediction.strip() == expected.strip()
