"""model=hf trains through the trained-position loss and per-document attention exactly as through full
logits and the dense mask: plain, tied, LoRA, and architectures that transform their logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.56")

from sft.loss import batch_loss_sum, full_logits_loss_sum  # noqa: E402
from sft.model import build_model  # noqa: E402
from sft.model.hf import HFModelError  # noqa: E402
from tests.helpers import (  # noqa: E402
    LORA,
    assert_relative_close,
    hf_section,
    loss_and_grads,
    make_model_dir,
    packed_batch,
)

SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def save_random_model(directory: Path, config: transformers.PretrainedConfig) -> Path:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def full_logits_reference(model, batch):
    logits = model(
        batch["input_ids"], position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids")
    )
    return full_logits_loss_sum(logits, batch["labels"])


def assert_same_training_signal(model, batch, rtol: float = 1e-6) -> None:
    want_loss, want_grads = loss_and_grads(model, lambda: full_logits_reference(model, batch))
    got_loss, got_grads = loss_and_grads(model, lambda: batch_loss_sum(model, batch, chunk_tokens=5))
    assert abs(float(got_loss - want_loss)) / float(want_loss) < rtol
    assert_relative_close(got_grads, want_grads, rtol)


@pytest.mark.parametrize("variant", ["untied", "tied", "lora"])
def test_chunked_loss_equals_full_logits_for_a_transformers_model(tmp_path, variant):
    directory = make_model_dir(tmp_path, vocab_size=97, tie_word_embeddings=variant == "tied")
    model = build_model(hf_section(directory, lora=LORA if variant == "lora" else None)).train()
    assert_same_training_signal(model, packed_batch())


@pytest.mark.parametrize(
    "config",
    [
        transformers.Gemma2Config(vocab_size=97, head_dim=8, final_logit_softcapping=0.5, **SMALL),
        transformers.CohereConfig(vocab_size=97, logit_scale=3.0, **SMALL),
        transformers.GraniteConfig(vocab_size=97, logits_scaling=0.25, **SMALL),
    ],
    ids=["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"],
)
def test_architectures_that_transform_their_logits_keep_their_loss(tmp_path, config):
    model = build_model(hf_section(save_random_model(tmp_path, config))).train()
    batch = {key: packed_batch()[key] for key in ("input_ids", "labels")}  # unpacked rows
    assert_same_training_signal(model, batch)


def test_an_architecture_whose_logits_the_head_does_not_reproduce_is_refused(tmp_path):
    """A Qwen2 config that carries Granite's `logits_scaling`: Qwen2 ignores it, the head would apply it."""
    directory = save_random_model(tmp_path, transformers.Qwen2Config(vocab_size=97, **SMALL))
    settings = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**settings, "logits_scaling": 4.0}))
    with pytest.raises(HFModelError, match="does not reproduce"):
        build_model(hf_section(directory))


def test_per_document_sdpa_trains_exactly_as_the_dense_mask(tmp_path):
    directory = make_model_dir(tmp_path, vocab_size=97)
    results = []
    for mode in ("dense", "documents"):
        model = build_model(hf_section(directory, packed_attention=mode)).train()
        results.append(
            loss_and_grads(model, lambda m=model: batch_loss_sum(m, packed_batch(), chunk_tokens=5))
        )
    (dense_loss, dense_grads), (loss, grads) = results
    assert abs(float(loss - dense_loss)) / float(dense_loss) < 1e-6
    assert_relative_close(grads, dense_grads, 1e-5)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_activation_checkpointing_keeps_the_loss_and_gradients(tmp_path, lora):
    directory = make_model_dir(tmp_path, vocab_size=97)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation
        model = build_model(hf_section(directory, lora=lora, activation_checkpointing=checkpointing)).train()
        mlp_runs = []
        model.base_model.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_runs.append(1))
        results.append(
            loss_and_grads(model, lambda m=model: batch_loss_sum(m, packed_batch(), chunk_tokens=5))
        )
        assert len(mlp_runs) == (2 if checkpointing else 1)  # recomputed in backward
    (plain_loss, plain_grads), (loss, grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert_relative_close(grads, plain_grads, 1e-6)


def test_flash_attention_gets_the_varlen_arguments_transformers_derives_from_positions(tmp_path):
    """FlashAttention (GPU) isolates documents through `cu_seq_lens`: ours, from the document ids, are the
    ones transformers would derive from per-document position_ids over the flattened batch."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    model = build_model(hf_section(make_model_dir(tmp_path, vocab_size=97)))
    model.base_model.config._attn_implementation = "flash_attention_2"  # no kernel is called here
    batch = packed_batch()
    document_ids, position_ids = batch["document_ids"][:, :21], batch["position_ids"][:, :21]  # no padding
    arguments = model.packing_arguments(document_ids)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    assert arguments["cu_seq_lens_q"].tolist() == cu_q.tolist() == arguments["cu_seq_lens_k"].tolist()
    assert arguments["max_length_q"] == int(max_q) == arguments["max_length_k"]
    assert "attention_mask" not in arguments  # a mask would send transformers down its unpadding path


def test_per_document_sdpa_refuses_a_sliding_window_shorter_than_a_document(tmp_path):
    slides = dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)  # every layer slides
    config = transformers.Qwen2Config(vocab_size=97, **slides, **SMALL)
    model = build_model(hf_section(save_random_model(tmp_path, config)))
    short = {key: value[:, :21] for key, value in packed_batch().items()}  # documents of 7, 9 and 5 tokens
    with pytest.raises(HFModelError, match="slides a window"):
        batch_loss_sum(model, short)
    first_document = {key: value[:1, :7] for key, value in packed_batch().items()}
    assert torch.isfinite(batch_loss_sum(model, first_document)[0])  # within the window: exact, allowed
