"""Scores of one generated assistant turn against its reference (pure Python, no torch).

- exact_match: the texts are equal (surrounding whitespace ignored).
- normalized_exact_match / token_f1: SQuAD's rules: lower-cased, punctuation and the articles a/an/the
  removed, whitespace collapsed; F1 over the multiset of words (two empty answers score 1).
- tool calls, when the reference makes any: `tool_call_parses` (the generation holds calls and each
  parses as one), `tool_call_name` (the same function names, in order) and `tool_call_arguments`
  (names and arguments equal, arguments compared as JSON values, so key order and spacing do not count,
  true is not 1, 2.0 is 2). Where a call's format writes a string as it is and any other value as JSON
  (Qwen3.5's `<parameter=…>`, GLM's `<arg_value>`), both sides' arguments compare as that format writes
  them: a string "2" and the number 2 are both `2` there, a string "Bern" is `Bern`, never `"Bern"`.

Reference calls are the turn's structured calls or, without them, the calls its text holds; calls in text
are read as the template that rendered the reference writes them (sft.tool_call_text).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sft.tool_call_text import Call, FoundCall, find_tool_calls, tool_call

SCORE_NAMES = (  # every score an item can have, in the order reports and tables show them
    "exact_match",
    "normalized_exact_match",
    "token_f1",
    "tool_call_parses",
    "tool_call_name",
    "tool_call_arguments",
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(generated: str, reference: str) -> float:
    return float(generated.strip() == reference.strip())


def normalized_exact_match(generated: str, reference: str) -> float:
    return float(normalize_answer(generated) == normalize_answer(reference))


def token_f1(generated: str, reference: str) -> float:
    generated_words, reference_words = (
        normalize_answer(generated).split(),
        normalize_answer(reference).split(),
    )
    if not generated_words or not reference_words:
        return float(generated_words == reference_words)
    common = sum((Counter(generated_words) & Counter(reference_words)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(generated_words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def tool_calls_in_text(text: str, template: Any = None) -> list[dict[str, Any] | None]:
    """Each call `text` holds, in `template`'s format (every common one without it), None where its text
    does not parse."""
    return [found.call for found in find_tool_calls(text, template)]


def tool_call_scores(
    generated: str, reference_calls: Sequence[Any], template: Any = None
) -> dict[str, float]:
    """The three tool-call scores of a generation against the reference's calls (structured, or found in
    its text)."""
    expected = [_with_texts(call) for call in reference_calls]
    produced = [_with_texts(found) for found in find_tool_calls(generated, template)]
    parses = bool(produced) and all(call is not None for call, _ in produced)
    names_match = parses and [c["name"] for c, _ in produced] == [c and c["name"] for c, _ in expected]
    arguments_match = names_match and all(map(_same_arguments, produced, expected))
    return {
        "tool_call_parses": float(parses),
        "tool_call_name": float(names_match),
        "tool_call_arguments": float(arguments_match),
    }


def _with_texts(call: Any) -> tuple[Call | None, Mapping[str, str] | None]:
    """(the call, its arguments' texts where its format writes them as text)."""
    return (call.call, call.written) if isinstance(call, FoundCall) else (tool_call(call), None)


def _same_arguments(
    first: tuple[Call | None, Mapping[str, str] | None], second: tuple[Call | None, Mapping[str, str] | None]
) -> bool:
    if first[1] is None and second[1] is None:
        return _json_key(first[0]["arguments"]) == _json_key(second[0]["arguments"])
    return _text_keys(*first) == _text_keys(*second)


def _text_keys(call: Call, written: Mapping[str, str] | None) -> dict[str, tuple[str, str]]:
    """Each argument as a format that writes text writes it (a string as it is, any other value as JSON),
    then read back: as a JSON value where the text is one, else as the text."""
    if written is None:
        written = {
            key: value if isinstance(value, str) else json.dumps(value)
            for key, value in call["arguments"].items()
        }
    keys = {}
    for key, text in written.items():
        try:
            keys[key] = ("json", _json_key(json.loads(text)))
        except ValueError:
            keys[key] = ("text", text)
    return keys


def _json_key(value: Any) -> str:
    """A JSON value's canonical text: keys sorted, a whole float as its integer (JSON has one number)."""
    return json.dumps(_whole_floats_as_int(value), sort_keys=True)


def _whole_floats_as_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {key: _whole_floats_as_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_int(item) for item in value]
    return value


def score_generation(
    generated: str, reference: str, reference_calls: Sequence[Any] | None = None, template: Any = None
) -> dict[str, float]:
    """Every score of one item; tool-call scores only when the reference calls tools. `template` is the
    chat template that rendered the reference (its call format); None reads every common format."""
    calls = list(reference_calls or []) or [
        found for found in find_tool_calls(reference, template) if found.call is not None
    ]
    scores = {
        "exact_match": exact_match(generated, reference),
        "normalized_exact_match": normalized_exact_match(generated, reference),
        "token_f1": token_f1(generated, reference),
    }
    if calls:
        scores.update(tool_call_scores(generated, calls, template))
    return scores


def mean_scores(per_item: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Each score averaged over the items that have it (tool-call scores: over tool-call items)."""
    totals: dict[str, list[float]] = {}
    for scores in per_item:
        for name, value in scores.items():
            totals.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in totals.items()}
