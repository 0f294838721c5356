"""Generation-based evaluation: items are the trained assistant turns with their inference prompts, batched
generation equals one-by-one generation, the HTML page escapes everything, and `sft-eval ckpt=[a,b]` puts
a trained and an untrained checkpoint side by side on the same items."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sft.cli import eval as eval_cli
from sft.eval_report import render_html
from sft.evaluate import exact_match_counts, generate_reply, sample_eval_items
from sft.generation_eval import GenerationSettings, generate_batch, generation_items
from sft.loss import full_logits_loss_sum
from sft.model.generate import generate
from sft.protocol.pipeline import Accounting, ConversationEncoder, read_conversations
from sft.protocol.templates import BUILTINS, render_chat_prompt
from sft.protocol.types import ProtocolConfig
from tests.helpers import tiny_decoder, tiny_model, write_checkpoint

HELD_OUT = [
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Reverse: 3 1 2"},
            {"role": "assistant", "content": "2 1 3"},
            {"role": "user", "content": "Sort it"},
            {"role": "assistant", "content": "Not trained", "train": False},
            {"role": "user", "content": "Sort it, please"},
            {"role": "assistant", "content": "1 2 3"},
        ]
    },
]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    path = tmp_path_factory.mktemp("held-out") / "held_out.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in HELD_OUT), encoding="utf-8")
    return str(path)


def test_gpt_oss_items_are_each_turn_after_its_prompt_without_the_marker_generation_stops_at(monkeypatch):
    """A template with several end markers (GPT-OSS: <|end|> inside a turn, <|call|>, <|return|>) and a
    history it renders otherwise than the prompt: each reference is the turn's text without the marker
    that ends it, and generation stops at any of the template's stop tokens."""
    import importlib.resources
    from pathlib import Path

    import sft.generation_eval
    from sft.generation_eval import evaluate_generations
    from sft.protocol.templates import JinjaTemplate
    from sft.protocol.types import Conversation, Message, ToolCall
    from tests.helpers import make_tokenizer

    pytest.importorskip("trl")
    source = Path(str(importlib.resources.files("trl") / "chat_templates" / "gptoss.jinja")).read_text()
    markers = ["<|return|>", "<|end|>", "<|call|>"]
    template = JinjaTemplate(source, eot=markers, stop=["<|return|>", "<|call|>"])
    tokenizer = make_tokenizer([*markers, "<|start|>", "<|channel|>", "<|message|>"], 300)
    call = ToolCall("get_weather", {"city": "Bern"}, id="call_1")
    messages = [
        Message("user", "Weather in Bern?"),
        Message("assistant", "", reasoning="Look it up.", tool_calls=(call,)),
        Message("tool", "21 C", tool_call_id="call_1", name="get_weather"),
        Message("assistant", "It is 21 C.", reasoning="Report it."),
        Message("user", "Thanks."),
        Message("assistant", "Bye."),
    ]
    encoder = ConversationEncoder(tokenizer, template, ProtocolConfig())
    items = generation_items([[Conversation(messages)]], encoder, max_items=10)
    assert [item.prompt for item in items] == [
        template.render_text(messages[:turn], add_generation_prompt=True) for turn in (1, 3, 5)
    ]
    assert [item.reference for item in items] == [
        "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Bern"}',
        "<|channel|>analysis<|message|>Report it.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 21 C.",
        "<|channel|>final<|message|>Bye.",
    ]
    answers = [
        tokenizer.encode(item.reference + stop).ids
        for item, stop in zip(items, ["<|call|>", "<|return|>", "<|return|>"])
    ]
    monkeypatch.setattr(
        sft.generation_eval, "generate_batch", lambda model, prompts, *args, **kwargs: answers
    )
    model = tiny_decoder()
    generations, metrics = evaluate_generations(
        model, tokenizer, template.stop_tokens, items, GenerationSettings()
    )
    assert [(g.text, g.stopped) for g in generations] == [(item.reference, True) for item in items]
    assert metrics["gen/exact_match"] == 1.0


def test_items_are_the_trained_turns_with_their_inference_prompts(held_out, tokenizer):
    template = BUILTINS["chatml"]
    encoder = ConversationEncoder(tokenizer, template, ProtocolConfig())
    items = generation_items([read_conversations(held_out)], encoder, max_items=10)
    assert [(item.where, item.turn) for item in items] == [
        (f"{held_out}:1", 1),
        (f"{held_out}:2", 2),
        (f"{held_out}:2", 6),
    ]
    assert [item.reference for item in items] == ["Hi there.", "2 1 3", "1 2 3"]
    for item in items:
        assert item.prompt.endswith("<|im_start|>assistant\n")
        assert item.prompt_ids == tokenizer.encode(item.prompt, add_special_tokens=False).ids
    # What training trains on: the prompt, then the reference through the end-of-turn marker.
    whole = render_chat_prompt(
        encoder.prepare(next(iter(read_conversations(held_out))), 0)[0].messages, template
    )
    assert whole.text.startswith(items[0].prompt + items[0].reference + template.eot)
    assert len(generation_items([read_conversations(held_out)], encoder, max_items=2)) == 2


def batch_rows_seen(model) -> list[int]:
    """The batch size of every forward the model runs from now on (a hook appends to the list returned)."""
    rows: list[int] = []
    model.register_forward_hook(
        lambda module, args, kwargs, output: rows.append(args[0].shape[0]), with_kwargs=True
    )
    return rows


def test_prompts_of_different_lengths_decode_together_as_each_would_alone():
    model = tiny_decoder()
    generator = torch.Generator().manual_seed(0)
    lengths = (3, 7, 1, 5, 12, 2, 9, 36)  # 36: the 40-token context leaves that row 4 new tokens, not 8
    prompts = [torch.randint(0, 64, (length,), generator=generator).tolist() for length in lengths]
    free_runs = [generate(model, prompt, 8, set()) for prompt in prompts]
    stop_ids = {free_runs[1][2], free_runs[4][5]}  # tokens that rows reach at different steps
    expected = [generate(model, prompt, 8, stop_ids) for prompt in prompts]
    stopped_at = {len(ids) for ids in expected if ids[-1] in stop_ids}
    assert len(stopped_at) > 1 and any(len(ids) == 8 for ids in expected) and len(expected[-1]) <= 4

    rows = batch_rows_seen(model)
    assert generate_batch(model, prompts, 8, stop_ids, batch_size=len(prompts)) == expected
    assert max(rows) == len(prompts)  # one batch of eight lengths: left-padded, not grouped by length
    for batch_size in (2, 3):
        assert generate_batch(model, prompts, 8, stop_ids, batch_size=batch_size) == expected
    assert generate_batch(model, [[1] * 40, [], prompts[0]], 8, stop_ids, batch_size=3) == [
        [],
        [],
        expected[0],
    ]


def test_the_page_escapes_every_text():
    hostile = '<script>alert("x")</script> & <b>'
    generation = {"text": hostile, "stopped": False, "scores": {"exact_match": 0.0}}
    report = {
        "checkpoints": [{"ckpt": hostile, "data": hostile, "metrics": {"gen/exact_match": 0.0}}],
        "items": [
            {
                "where": hostile,
                "turn": 1,
                "prompt": hostile,
                "reference": hostile,
                "generations": [generation],
            }
        ],
    }
    page = render_html(report)
    assert "<script>" not in page and "<b>" not in page
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;"
    assert page.count(escaped) == 7  # data, ckpt (twice), where, prompt, reference, generation
    assert page.startswith("<!doctype html>") and "http" not in page  # self-contained


def memorize(path: str, tokenizer, steps: int = 60):
    """A `steer` for write_checkpoint: a few AdamW steps on the trained tokens of a file, so that greedy
    decoding reproduces their answers."""

    def train(model):
        encoder = ConversationEncoder(tokenizer, BUILTINS["chatml"], ProtocolConfig())
        examples = list(encoder.encode_file(path, "auto", Accounting()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(steps):
            for example in examples:
                ids, labels = (torch.from_numpy(a)[None] for a in (example.input_ids, example.labels))
                loss_sum, count = full_logits_loss_sum(model(ids), labels)
                optimizer.zero_grad()
                (loss_sum / count).backward()
                optimizer.step()

    return train


def test_two_checkpoints_side_by_side_on_the_same_items(held_out, tokenizer, tmp_path, monkeypatch, capsys):
    trained = write_checkpoint(tmp_path / "trained.ckpt", tokenizer, steer=memorize(held_out, tokenizer))
    untrained = write_checkpoint(tmp_path / "untrained.ckpt", tokenizer)
    out = tmp_path / "report.json"
    argv = [f"ckpt=[{trained},{untrained}]", f"data.val=[{held_out}]", "eval.max_new_tokens=12"]
    monkeypatch.setattr(sys, "argv", ["sft-eval", *argv, f"out={out}", "device=cpu"])
    monkeypatch.chdir(tmp_path)
    eval_cli.main()
    report = json.loads(out.read_text())
    first, second = report["checkpoints"]
    assert (first["ckpt"], second["ckpt"]) == (str(trained), str(untrained))
    assert first["metrics"]["gen/exact_match"] == 1.0 and first["metrics"]["gen/token_f1"] == 1.0
    assert second["metrics"]["gen/exact_match"] < 1.0
    assert first["metrics"]["val/loss"] < second["metrics"]["val/loss"]
    assert [item["reference"] for item in report["items"]] == ["Hi there.", "2 1 3", "1 2 3"]
    for item in report["items"]:
        mine, theirs = item["generations"]
        assert mine["text"] == item["reference"] and mine["stopped"]
        assert mine["scores"]["exact_match"] == 1.0
    printed = capsys.readouterr().out
    assert "3 items, 2 checkpoints" in printed and "gen/exact_match" in printed
    page = (tmp_path / "report.html").read_text()
    assert str(trained) in page and str(untrained) in page and "Hi there." in page


def test_batched_generation_equals_one_by_one_with_a_transformers_model(tmp_path):
    pytest.importorskip("transformers", minversion="4.56")
    from sft.model import build_model
    from tests.helpers import make_model_dir

    model = build_model({"name": "hf", "path": str(make_model_dir(tmp_path / "tiny-llama"))}).eval()
    prompts = [[5, 17, 42], [9, 9, 1, 30, 2, 6], [3], [8, 8, 8, 11]]
    stop_ids = {generate(model, prompts[1], 6, set())[2]}
    expected = [generate(model, prompt, 6, stop_ids) for prompt in prompts]
    rows = batch_rows_seen(model)
    assert generate_batch(model, prompts, 6, stop_ids, batch_size=4) == expected
    assert max(rows) == 4 and any(ids[-1] in stop_ids for ids in expected)


def test_sample_exact_match_decodes_in_batches_what_each_item_gives_alone(tokenizer):
    """Each item's reference is the model's own reply generated alone: batched, every one must match."""
    model = tiny_model(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=512)
    chatml = BUILTINS["chatml"]
    items = [(messages, "") for messages, _ in sample_eval_items(seed=3, count=40, max_items=9)]
    alone = [(messages, generate_reply(model, messages, tokenizer, chatml, 12)[0]) for messages, _ in items]
    assert len({reply for _, reply in alone}) > 1  # replies differ: a batching mix-up would show
    rows = batch_rows_seen(model)
    assert exact_match_counts(model, alone, tokenizer, chatml, 12, batch_size=4) == (9, 9)
    assert max(rows) == 4


def test_each_prompt_decodes_up_to_its_own_budget():
    model = tiny_decoder()
    prompts = [[5, 17, 42], [9, 9, 1, 30, 2, 6], [3], [8, 8, 8, 11]]
    budgets = [2, 9, 5, 1]
    expected = [generate(model, prompt, budget, set()) for prompt, budget in zip(prompts, budgets)]
    assert [len(ids) for ids in expected] == budgets
    for batch_size in (2, 4):
        assert generate_batch(model, prompts, budgets, set(), batch_size=batch_size) == expected


def test_without_max_new_tokens_no_reference_is_cut_and_stopped_says_how_many_were(monkeypatch, tokenizer):
    """A 32-token budget for all (the old default) cuts a long reference, which then cannot match; the
    default budgets each item by its reference, and gen/stopped reports the fraction that ended."""
    import sft.generation_eval
    from sft.generation_eval import evaluate_generations
    from sft.protocol.types import Conversation, Message

    long_answer = " ".join(str(number) for number in range(60))
    conversations = [
        Conversation([Message("user", "Count"), Message("assistant", long_answer)]),
        Conversation([Message("user", "Hi"), Message("assistant", "Hello.")]),
    ]
    encoder = ConversationEncoder(tokenizer, BUILTINS["chatml"], ProtocolConfig())
    items = generation_items([conversations], encoder, max_items=10)
    answers = [tokenizer.encode(item.reference + "<|im_end|>").ids for item in items]
    assert len(answers[0]) > 40
    budgets_seen = []

    def replay(model, prompts, budgets, *args):  # the model that answers every reference exactly
        budgets_seen.append(budgets)
        limits = [budgets] * len(prompts) if isinstance(budgets, int) else budgets
        return [answer[:limit] for answer, limit in zip(answers, limits)]

    monkeypatch.setattr(sft.generation_eval, "generate_batch", replay)
    model = tiny_decoder()
    _, metrics = evaluate_generations(model, tokenizer, ["<|im_end|>"], items, GenerationSettings())
    assert metrics["gen/exact_match"] == 1.0 and metrics["gen/stopped"] == 1.0
    assert budgets_seen[-1] == [len(answer) + 16 for answer in answers]
    fixed = GenerationSettings(max_new_tokens=32)
    generations, metrics = evaluate_generations(model, tokenizer, ["<|im_end|>"], items, fixed)
    assert [g.stopped for g in generations] == [False, True]
    assert metrics["gen/exact_match"] == 0.5 and metrics["gen/stopped"] == 0.5
