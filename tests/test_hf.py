"""model=hf: a tiny random transformers Llama saved to a temporary directory (no network) trains through the
project's module with packing kept invisible, and comes back out as a transformers directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.56")  # model=hf's floor ([hf] extra)

from hydra import compose, initialize_config_module  # noqa: E402

from sft.cli.schemas import TrainConfig  # noqa: E402
from sft.config import ConfigError, load_config  # noqa: E402
from sft.data.collate import collate_rows, example_row, packed_row  # noqa: E402
from sft.loss import batch_loss_sum  # noqa: E402
from sft.model import build_model  # noqa: E402
from sft.model.generate import generate  # noqa: E402
from sft.model.hf import HFCausalLM, HFModelError  # noqa: E402
from sft.model.llama import KVCache  # noqa: E402
from tests.helpers import (  # noqa: E402
    LORA,
    hf_section,
    make_model_dir,
    split_conversation_rows,
    trained_document,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize(
    "attn_implementation, packed_attention, runs_as",
    [("sdpa", "auto", "documents"), ("sdpa", "dense", "dense"), ("eager", "auto", "dense")],
)
def test_packed_row_gives_each_example_its_logits_alone(
    model_dir, attn_implementation, packed_attention, runs_as
):
    section = hf_section(
        model_dir, attn_implementation=attn_implementation, packed_attention=packed_attention
    )
    model = build_model(section).eval()
    assert isinstance(model, HFCausalLM) and model.packed_attention == runs_as
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3]
    examples = [torch.randint(0, 300, (length,), generator=generator) for length in lengths]
    padding = 4
    pad = torch.zeros(padding, dtype=torch.long)
    input_ids = torch.cat([*examples, pad])[None]
    position_ids = torch.cat([*(torch.arange(n) for n in lengths), pad])[None]  # padding: position 0
    document_ids = torch.cat([*(torch.full((n,), i) for i, n in enumerate(lengths)), pad - 1])  # padding: -1
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, document_ids=document_ids[None])[0]
        alone = [model(example[None])[0] for example in examples]
    assert torch.isfinite(packed).all()
    torch.testing.assert_close(packed[: sum(lengths)], torch.cat(alone), atol=1e-5, rtol=0)
    # The mask alone isolates the documents (transformers 5 would also infer them from restarting
    # position_ids; transformers 4 would not): the same documents with their positions continuing differ
    # from the alone-run only through the rotary offsets, so the first document is still exact.
    with torch.no_grad():
        continuing = model(input_ids, document_ids=document_ids[None])[0]
    torch.testing.assert_close(continuing[: lengths[0]], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "attn_implementation, packed_attention", [("sdpa", "auto"), ("sdpa", "dense"), ("eager", "auto")]
)
def test_prefix_trees_give_the_loss_and_gradients_of_their_rows_run_separately(
    model_dir, attn_implementation, packed_attention
):
    """Split conversations packed as prefix trees (data.prefix_sharing) take a dense tree mask here."""
    rng = np.random.default_rng(0)
    units = [split_conversation_rows(rng, 3, vocab=300), [trained_document(rng, vocab=300)]]
    trees = collate_rows([packed_row(units)])
    rows = collate_rows([example_row(ids, labels) for unit in units for ids, labels in unit])
    results = []
    for batch in (trees, rows):
        torch.manual_seed(0)
        model = build_model(
            hf_section(model_dir, attn_implementation=attn_implementation, packed_attention=packed_attention)
        )
        loss_sum, count = batch_loss_sum(model, batch)
        loss_sum.backward()
        results.append(
            (loss_sum.detach(), int(count), [p.grad for p in model.parameters() if p.grad is not None])
        )
    (tree_loss, tree_count, tree_grads), (row_loss, row_count, row_grads) = results
    assert tree_count == row_count and len(tree_grads) == len(row_grads)
    torch.testing.assert_close(tree_loss, row_loss, rtol=1e-6, atol=0)
    for got, want in zip(tree_grads, row_grads, strict=True):
        assert torch.linalg.norm(got - want) <= 5e-6 * torch.linalg.norm(want)


def test_prefix_trees_are_refused_where_the_attention_cannot_take_a_tree(model_dir):
    model = build_model(hf_section(model_dir))
    model.base_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(HFModelError, match="data.prefix_sharing=false"):
        model.tree_arguments(torch.tensor([[2, 2]]))


@pytest.mark.parametrize(
    "attn_implementation, packed_attention",
    [("sdpa", "flex"), ("eager", "documents"), ("flex_attention", "dense")],
)
def test_packing_is_refused_where_documents_cannot_be_isolated(
    model_dir, attn_implementation, packed_attention
):
    section = hf_section(
        model_dir, attn_implementation=attn_implementation, packed_attention=packed_attention
    )
    with pytest.raises(HFModelError, match="data.packing=false"):
        build_model(section)


def test_logits_match_transformers_and_kv_cache_generation_matches_full_forward(model_dir):
    model = build_model(hf_section(model_dir)).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids).logits, atol=1e-5, rtol=0)
    new_ids = generate(model, ids[0].tolist(), max_new_tokens=6, stop_ids=set())
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert new_ids == expected[0, ids.shape[1] :].tolist()
    cache = KVCache(max_len=8)
    with torch.no_grad():
        prefill, rest = model(ids[:, :3], kv_cache=cache), model(ids[:, 3:], kv_cache=cache)
    step_by_step = torch.cat([prefill, rest], dim=1)
    assert cache.length == 5
    torch.testing.assert_close(step_by_step, reference(ids).logits, atol=1e-5, rtol=0)


def test_the_model_vocab_rules_and_a_bigger_tokenizer_is_refused(model_dir, tmp_path):
    model = build_model({**hf_section(model_dir), "vocab_size": 280})  # fewer tokenizer ids: no resize
    assert model.base_model.get_input_embeddings().num_embeddings == model.config.vocab_size
    small = make_model_dir(tmp_path, vocab_size=64)
    with pytest.raises(HFModelError, match="embedding has only 64 rows"):
        build_model({**hf_section(small), "vocab_size": 300})


def test_dtype_follows_the_hardware_precision_or_model_dtype(model_dir):
    cases = [("bf16-true", torch.bfloat16), ("bf16-mixed", torch.float32), ("float16", torch.float16)]
    for dtype, expected in cases:
        model = build_model(hf_section(model_dir, dtype=dtype))
        assert next(model.parameters()).dtype == expected, dtype


def compose_train(*overrides: str) -> TrainConfig:
    with initialize_config_module("sft.conf", version_base="1.3"):
        return load_config(compose("train", overrides=list(overrides)), TrainConfig)


def test_model_hf_points_tokenizer_and_template_at_the_model_directory(model_dir):
    config = compose_train("model=hf", f"model.path={model_dir}", "hardware=bf16")
    assert config.model.dtype == "bf16-mixed"
    assert (config.tokenizer.name, config.tokenizer.path) == ("file", str(model_dir))
    assert config.template.name == "jinja" and config.template.path == str(model_dir)
    with pytest.raises(ConfigError, match="model.path"):
        compose_train("model=hf")
    with pytest.raises(ConfigError, match="did you mean model.lora.alpha"):
        compose_train("model=hf", f"model.path={model_dir}", "model.lora={r: 4, alpa: 8}")


def train_briefly(model: HFCausalLM, steps: int = 3) -> None:
    """A few optimizer steps on random ids, so that exported weights differ from the pretrained ones."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 250, (2, 12), generator=generator)
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def save_checkpoint(model: HFCausalLM, model_config: dict, model_dir: Path, path: Path) -> Path:
    """A checkpoint shaped as sft-train writes one (what load_for_inference reads)."""
    from sft.protocol.templates import load_template, standalone_config
    from sft.protocol.tokenizer import load_tokenizer

    template = standalone_config(load_template({"name": "jinja", "path": str(model_dir)}))
    checkpoint = {
        "hyper_parameters": {"model_config": model_config},
        "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
        "sft": {"tokenizer": load_tokenizer(model_dir).to_str(), "template": template},
    }
    torch.save(checkpoint, path)
    return path


def reference_logits(model: HFCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


def test_export_of_a_fine_tuned_hf_model_loads_in_transformers_with_equal_logits(model_dir, tmp_path):
    from sft.export import export_checkpoint

    model_config = {**hf_section(model_dir), "vocab_size": 300}
    model = build_model(model_config)
    train_briefly(model)
    ckpt = save_checkpoint(model, model_config, model_dir, tmp_path / "last.ckpt")
    out = export_checkpoint(ckpt, tmp_path / "exported")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference_logits(model, ids), atol=1e-5, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation_config = json.loads((out / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == eot_id and exported.generation_config.eos_token_id == eot_id
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n"


def test_lora_trains_only_the_adapter_and_exports_merged_or_alone(model_dir, tmp_path):
    PeftModel = pytest.importorskip("peft").PeftModel

    from sft.export import export_checkpoint

    model_config = {**hf_section(model_dir, lora=LORA), "vocab_size": 300}
    model = build_model(model_config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, for q_proj and v_proj, in both layers
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    train_briefly(model)
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    ckpt = save_checkpoint(model, model_config, model_dir, tmp_path / "last.ckpt")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    expected = reference_logits(model, ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4)  # the adapter changed something

    load = transformers.AutoModelForCausalLM.from_pretrained
    merged = load(export_checkpoint(ckpt, tmp_path / "merged")).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)

    adapter_dir = export_checkpoint(ckpt, tmp_path / "adapter", merge=False)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()
    assert (adapter_dir / "tokenizer.json").is_file() and (adapter_dir / "chat_template.jinja").is_file()
    adapted = PeftModel.from_pretrained(load(model_dir), adapter_dir)
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(ids).logits, expected, atol=1e-5, rtol=0)

    model.save_adapter(tmp_path / "run-adapter")  # what a training run writes to <run dir>/adapter/
    assert (tmp_path / "run-adapter" / "adapter_config.json").is_file()
