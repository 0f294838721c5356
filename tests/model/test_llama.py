"""The Llama decoder: parity with transformers, packing, the KV cache, gradients, counts, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sft.model import build_model
from sft.model.llama import KVCache, LlamaForCausalLM
from tests.helpers import random_ids, tiny_config, tiny_model

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def test_state_dict_names_are_hf_llama_names():
    keys = set(tiny_model(tie_word_embeddings=True).state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(3):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")}
    assert keys == expected


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=False, num_key_value_heads=2),
        dict(tie_word_embeddings=True, num_key_value_heads=1),
        dict(tie_word_embeddings=False, num_key_value_heads=4, rope_theta=500000.0, rms_norm_eps=1e-6),
    ],
    ids=["gqa", "tied-mqa", "mha-theta"],
)
def test_logits_match_transformers(overrides):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(**overrides)
    hf_config = transformers.LlamaConfig(**ours.config.to_hf_dict())
    hf_config._attn_implementation = "eager"  # an independent reference, not SDPA again
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)

    input_ids = random_ids(2, 24)
    position_ids = torch.arange(5, 29).expand(2, -1)  # an offset start exercises the RoPE tables
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        expected_shifted = reference(input_ids=input_ids, position_ids=position_ids).logits
        torch.testing.assert_close(ours(input_ids), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours(input_ids, position_ids=position_ids), expected_shifted, atol=1e-5, rtol=0
        )


def test_to_hf_dict_builds_an_equivalent_transformers_config():
    transformers = pytest.importorskip("transformers")
    config = tiny_config(rope_theta=500000.0, tie_word_embeddings=True)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    assert hf_config.model_type == "llama" and hf_config.architectures == ["LlamaForCausalLM"]
    assert hf_config.head_dim == config.head_dim and hf_config.num_key_value_heads == 2
    assert hf_config.tie_word_embeddings and hf_config.eos_token_id is None
    rope_theta = getattr(hf_config, "rope_parameters", None) or {"rope_theta": hf_config.rope_theta}
    assert rope_theta["rope_theta"] == 500000.0


def test_packed_row_equals_each_example_alone():
    model = tiny_model()
    lengths = [7, 5, 9]
    examples = [random_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    pad = 4
    input_ids = torch.cat([*examples, torch.zeros(1, pad, dtype=torch.long)], dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])[None]
    pad_document = torch.full((pad,), -1)  # padding as its own document
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [pad_document])[None]

    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, document_ids=document_ids)
        alone = torch.cat([model(example) for example in examples], dim=1)
    assert torch.isfinite(packed).all()  # padding rows attend to themselves, never to nothing
    torch.testing.assert_close(packed[:, : sum(lengths)], alone, atol=1e-5, rtol=0)


def test_document_ids_of_one_document_equal_the_causal_fast_path():
    model = tiny_model()
    input_ids = random_ids(2, 16)
    with torch.no_grad():
        causal = model(input_ids)
        masked = model(input_ids, document_ids=torch.zeros(2, 16, dtype=torch.long))
    torch.testing.assert_close(masked, causal, atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_the_uncached_forward():
    model = tiny_model()
    input_ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(input_ids)
        cache = KVCache(max_len=20)
        # A multi-token prefill, a multi-token chunk onto a non-empty cache, then single tokens.
        chunks = [model(input_ids[:, :6], kv_cache=cache), model(input_ids[:, 6:11], kv_cache=cache)]
        chunks += [model(input_ids[:, t : t + 1], kv_cache=cache) for t in range(11, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_refuses_overflow_and_packed_rows():
    model = tiny_model()
    cache = KVCache(max_len=4)
    with pytest.raises(ValueError, match="KV cache full"):
        model(random_ids(1, 5), kv_cache=cache)
    with pytest.raises(ValueError, match="document_ids"):
        model(random_ids(1, 3), document_ids=torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_gradients_reach_every_parameter():
    model = tiny_model(tie_word_embeddings=True).train()
    input_ids = random_ids(2, 12)
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    logits = model(input_ids, document_ids=document_ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), input_ids[:, 1:].reshape(-1))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_and_flops(tied):
    model = tiny_model(tie_word_embeddings=tied)
    vocab, hidden, inter, layers, kv_dim = 97, 32, 72, 3, 2 * 8
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    total = embeddings + layers * per_layer + hidden
    assert model.num_parameters() == total == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) == total - vocab * hidden
    matmul_params = layers * per_layer + hidden + vocab * hidden
    assert model.flops_per_token(64) == 6 * matmul_params + 12 * layers * hidden * 64


def test_init_follows_hf():
    model = LlamaForCausalLM(tiny_config(initializer_range=0.02, num_hidden_layers=1))
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    assert abs(model.model.embed_tokens.weight.std().item() - 0.02) < 0.003


# model=hf (a pretrained directory, a _global_ package) is built in tests/test_hf.py and tests/test_config.py.
OWN_MODELS = sorted(path for path in CONF_DIR.glob("*.yaml") if path.stem != "hf")


@pytest.mark.parametrize("path", OWN_MODELS, ids=lambda p: p.stem)
def test_model_config_group_options_build(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["name"] == path.stem and cfg["vocab_size"] is None
    with torch.device("meta"):  # shapes only: no memory, no init cost for the larger options
        model = build_model(cfg | {"vocab_size": 1024})
    assert model.config.num_hidden_layers == cfg["num_hidden_layers"]


def test_build_model_names_the_problem():
    cfg = dict(
        name="x",
        vocab_size=None,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(cfg)
    with pytest.raises(ValueError, match="hidden_szie"):
        build_model(cfg | {"vocab_size": 10, "hidden_szie": 3})
    assert build_model(cfg | {"vocab_size": 10}).config.num_key_value_heads == 4
