"""sft-export: transformers loads the directory and computes our logits; the exported chat template gives
our training ids and trained-token mask; generation stops at the end-of-turn token. No network."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch
from safetensors import safe_open

from sft.checkpoint import load_for_inference
from sft.cli import export as export_cli
from sft.evaluate import prompt_ids
from sft.export import ExportError, builtin_jinja_source, check_chat_template, export_checkpoint
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.pipeline import Accounting, ConversationEncoder
from sft.protocol.templates import BUILTINS
from sft.protocol.types import Conversation, Message, ProtocolConfig
from tests.helpers import steered_checkpoint, write_checkpoint

transformers = pytest.importorskip("transformers")

# A Jinja training template whose rendering depends on a template kwarg (baked into the export as a default).
JINJA_SOURCE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml": "chatml",
    "llama3": "llama3",
    "microlm": "microlm",
    "jinja": {
        "name": "jinja",
        "source": JINJA_SOURCE,
        "eot": "<|im_end|>",
        "kwargs": {"default_system": "Be brief."},
    },
}
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are Sage, a helpful assistant."},
        {"role": "user", "content": "Reverse: 3 8 1"},
        {"role": "assistant", "content": "1 8 3"},
        {"role": "user", "content": "Now sort my list."},
        {"role": "assistant", "content": "1 3 8"},
    ],
    [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "Let me check the tool."},
        {"role": "tool", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "Ünïcödé, clear 🙂\n\n"},
    ],
]


def export(tmp_path, tokenizer, template="chatml", generation_tags=True, **model):
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", tokenizer, template, **model)
    return checkpoint, export_checkpoint(checkpoint, tmp_path / "hf", generation_tags=generation_tags)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_transformers_logits_equal_ours(tmp_path, tokenizer, tied):
    checkpoint, out = export(tmp_path, tokenizer, tie_word_embeddings=tied)
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert ("lm_head.weight" in weights.keys()) is not tied
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_for_inference(checkpoint).model
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("generation_tags", [True, False], ids=["tags", "no-tags"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_chat_template_gives_the_training_ids(tmp_path, tokenizer, name, generation_tags):
    checkpoint, out = export(tmp_path, tokenizer, TEMPLATES[name], generation_tags)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    bundle = load_for_inference(checkpoint)
    encoder = ConversationEncoder(bundle.tokenizer, bundle.template, ProtocolConfig())
    for conversation in CONVERSATIONS:
        for index, message in enumerate(conversation):
            if message["role"] == "assistant":  # every generation prompt of the conversation
                prefix = conversation[:index]
                theirs = hf_tokenizer.apply_chat_template(
                    prefix, add_generation_prompt=True, return_dict=True
                )
                assert theirs["input_ids"] == prompt_ids(prefix, bundle.tokenizer, bundle.template)
        (example,) = encoder.encode_conversations(
            [Conversation([Message(m["role"], m["content"]) for m in conversation])], Accounting()
        )
        theirs = hf_tokenizer.apply_chat_template(
            conversation, return_dict=True, return_assistant_tokens_mask=generation_tags
        )
        assert theirs["input_ids"] == example.input_ids.tolist()
        if generation_tags:  # transformers' assistant mask is exactly the tokens we trained
            assert theirs["assistant_masks"] == (example.labels != IGNORE_INDEX).astype(int).tolist()


def test_exported_model_generates_and_stops_at_the_end_of_turn_token(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "You are Nova"}, {"role": "user", "content": "Who are you?"}]
    checkpoint, reply_ids = steered_checkpoint(tmp_path / "steered.ckpt", tokenizer, messages)
    out = export_checkpoint(checkpoint, tmp_path / "hf")
    eot_id = tokenizer.token_to_id("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eot_id

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    inputs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    prompt = torch.tensor([inputs["input_ids"]])
    generated = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False
    )
    new_ids = generated[0, prompt.shape[1] :].tolist()
    assert new_ids == reply_ids + [eot_id]  # stopped right after the end-of-turn token, 20 allowed
    assert hf_tokenizer.decode(new_ids, skip_special_tokens=True) == tokenizer.decode(reply_ids)


def test_a_template_that_renders_differently_is_refused():
    with pytest.raises(ExportError, match="renders"):
        check_chat_template(
            builtin_jinja_source(BUILTINS["chatml"]), BUILTINS["microlm"], None, "<|endoftext|>"
        )


def test_exported_files_have_the_permissions_of_any_file_the_user_writes(tmp_path, tokenizer):
    _, out = export(tmp_path, tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()} == {
        path.name: 0o666 & ~umask for path in out.iterdir()
    }


def test_an_existing_directory_is_never_overwritten(tmp_path, tokenizer):
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", tokenizer)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_checkpoint(checkpoint, tmp_path / "hf")
    assert [path.name for path in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_console_entry_writes_only_the_directory(tmp_path, tokenizer, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "model.ckpt", tokenizer)
    monkeypatch.setattr(sys, "argv", ["sft-export", f"ckpt={checkpoint}", "out=hf", "dtype=bfloat16"])
    monkeypatch.chdir(tmp_path)
    export_cli.main()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hf", "model.ckpt"]
    assert sorted(path.name for path in (tmp_path / "hf").iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
