"""sft-prepare's contract command run as a user runs it: the export holds every example in input order,
a Jinja file renders as the builtin does, a bad line fails naming file and line (or is skipped, counted)."""

from __future__ import annotations

import json

import pytest

from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.tokenizer import load_tokenizer
from tests.helpers import TURNS, contract, run_prepare

pytestmark = pytest.mark.slow

CHATML_JINJA = (  # chatml without {% generation %} tags: spans come from the generation prompt
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def expected_example(tokenizer, turns: list[tuple[str, str]]) -> dict:
    """chatml rendered by hand, labels by the per-token overlap rule: independent of the pipeline."""
    text, spans = "", []
    for role, content in turns:
        text += f"<|im_start|>{role}\n"
        if role == "assistant":
            spans.append((len(text), len(text) + len(content) + len("<|im_end|>")))
        text += f"{content}<|im_end|>\n"
    encoding = tokenizer.encode(text, add_special_tokens=False)
    labels = [
        token if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
        for token, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
    return {"input_ids": encoding.ids, "labels": labels}


def test_contract_command_exports_examples_in_input_order(files, tmp_path):
    result = run_prepare(tmp_path, *contract(files, tmp_path))
    assert result.returncode == 0, result.stderr
    assert "read 5 = kept 5 + skipped 0 + dropped 0" in result.stdout
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(files["tok"])
    assert exported == [expected_example(tokenizer, turns) for turns in TURNS]
    assert all(list(example) == ["input_ids", "labels"] for example in exported)


def test_jinja_template_from_a_file_gives_the_same_examples(files, tmp_path):
    (tmp_path / "chat.jinja").write_text(CHATML_JINJA, encoding="utf-8")
    overrides = contract(
        files, tmp_path, f"template.path={tmp_path / 'chat.jinja'}", "template.eot='<|im_end|>'"
    )
    overrides[overrides.index("template=chatml")] = "template=jinja"
    result = run_prepare(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr
    exported = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert exported == [expected_example(load_tokenizer(files["tok"]), turns) for turns in TURNS]


def test_a_bad_line_fails_naming_file_and_line_or_is_skipped_and_counted(files, tmp_path):
    with open(files["b"], "a", encoding="utf-8") as file:
        file.write('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    failed = run_prepare(tmp_path, *contract(files, tmp_path))
    assert failed.returncode != 0
    assert f"{files['b']}:4: no_assistant_turn" in failed.stderr and "Traceback" not in failed.stderr

    skipped = run_prepare(tmp_path, *contract(files, tmp_path, "protocol.on_error=skip"))
    assert skipped.returncode == 0, skipped.stderr
    assert "read 6 = kept 5 + skipped 1 + dropped 0" in skipped.stdout
    assert f"skipped 1 no_assistant_turn: {files['b']}:4" in skipped.stdout
