"""A Llama decoder in plain PyTorch, parameter for parameter the same as transformers' LlamaForCausalLM.

Architectural choices (Llama 2/3's, so a checkpoint exports by renaming nothing):
- pre-norm residual blocks; RMSNorm normalized in fp32, cast back, then scaled (HF's order of operations);
- rotary position embeddings on q and k in HF's rotate_half (non-interleaved) layout, base `rope_theta`,
  driven by `position_ids` so packed documents restart at position 0;
- grouped-query attention: each of `num_key_value_heads` k/v heads serves a group of consecutive query heads;
- SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x));
- no biases; optional tied input/output embeddings;
- `F.scaled_dot_product_attention` with `is_causal` on the plain path; packed rows (`document_ids`) attend
  per document, through a flex block mask or a dense mask (sft.model.attention, `packed_attention`);
- the forward returns the final hidden states when asked (`return_hidden`), so the loss applies the output
  head to the trained positions only (sft.loss); optional per-layer activation checkpointing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sft.model.attention import AttentionPlan, PackedAttention, attend, padded_causal_mask, plan_attention


@dataclass
class LlamaConfig:
    """Hyperparameters under transformers' names, so `to_hf_dict` is a copy."""

    vocab_size: int | None  # null in the YAML: filled from the tokenizer (build_model refuses None)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: one k/v head per query head
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Training choices, not architecture (kept out of the exported config.json):
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (less memory)
    packed_attention: PackedAttention = "auto"  # how packed rows keep documents apart (sft.model.attention)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.LlamaConfig` (the body of an exported config.json).

        Token ids belong to the tokenizer: they are None here and the exporter fills them in, so that
        transformers' defaults (bos=1, eos=2) never stop generation on an arbitrary token.
        """
        architecture = {k: v for k, v in dataclasses.asdict(self).items() if k not in TRAINING_CHOICES}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **architecture,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            # transformers 5 reads rope_parameters; 4.x reads rope_theta (copied above) and keeps the rest.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        }


TRAINING_CHOICES = ("activation_checkpointing", "packed_attention")


class KVCache:
    """Keys and values of the tokens seen so far, for incremental decoding.

    Each layer's k/v buffer [batch, kv_heads, max_len, head_dim] is allocated on its first write, with the
    dtype and device of what is written (so it follows autocast); `length` positions are filled.
    The model advances `length` after each forward; set it to 0 to reuse the buffers.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' k/v for one layer; return that layer's k/v over all tokens so far."""
        if layer_idx == len(self.keys):
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        end = self.length + k.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics keep bf16 activations stable; scaling after the cast back matches HF bit for bit.
        normed = x.float()
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [B, T, head_dim] for `position_ids` [B, T], computed in fp32 as HF does.

    Computed per forward instead of kept as a buffer: a buffer would be cast by `model.to(bf16)` and left
    uninitialized by meta-device construction, and the tables are cheap.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / theta**exponents
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)  # rotate_half layout: dim i pairs with dim i + head_dim/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, head_dim] by the tables [B, T, head_dim], broadcast over heads."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def cache_and_positions(
    input_ids: Tensor, position_ids: Tensor | None, document_ids: Tensor | None, kv_cache: KVCache | None
) -> tuple[int, Tensor]:
    """(tokens already in the cache, position ids): positions default to continuing after the cache.
    Shared by every model with the project's forward signature."""
    batch, seq_len = input_ids.shape
    num_past = 0
    if kv_cache is not None:
        if document_ids is not None:
            raise ValueError("document_ids (packed rows) cannot be combined with a KV cache")
        num_past = kv_cache.length
        if num_past + seq_len > kv_cache.max_len:
            raise ValueError(f"KV cache full: {num_past} + {seq_len} tokens > max_len {kv_cache.max_len}")
    if position_ids is None:
        position_ids = torch.arange(num_past, num_past + seq_len, device=input_ids.device).expand(batch, -1)
    return num_past, position_ids


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KV-cache slot this layer owns
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_cache: KVCache | None
    ) -> Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = attend(q, k, v, plan)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, plan: AttentionPlan, kv_cache: KVCache | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the output head (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        subtree_end: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        seq_len = input_ids.shape[1]
        num_past, position_ids = cache_and_positions(input_ids, position_ids, document_ids, kv_cache)
        if attention_mask is not None:  # left-padded rows decoded together (sft.model.generate)
            plan = AttentionPlan(mask=padded_causal_mask(attention_mask, seq_len))
        else:
            plan = plan_attention(
                seq_len, num_past, document_ids, self.config.packed_attention, input_ids.device, subtree_end
            )
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        recompute = self.config.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:  # keep only the layer's input; its activations are recomputed in backward
                x = checkpoint(layer, x, cos, sin, plan, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, plan, kv_cache)
        if kv_cache is not None:
            kv_cache.length += seq_len
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    def init_weights(self) -> None:
        """HF's init: N(0, initializer_range) for every matrix, ones for the norms.

        Public so that a model built on the meta device can be initialized after `to_empty`.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        subtree_end: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, vocab] in fp32 for `input_ids` [B, T]; with `return_hidden` the final hidden states
        [B, T, hidden] instead, for `output_logits` at the positions that need them (training calls the
        forward, not a separate method, so that wrappers such as FSDP see it).

        position_ids [B, T]: default 0.. (after the cached tokens when `kv_cache` is given).
        document_ids [B, T]: a token attends only to earlier tokens with the same id, so a packed row gives
        each example's logits exactly as if it ran alone (with its positions restarting at 0). Ids must be
        unique per example within a row; padding may be its own id (e.g. -1).
        kv_cache: the new tokens attend to the cached ones, then are appended to the cache.
        subtree_end [B, T]: rows of prefix trees (sft.data.collate; instead of document_ids): token i sees
        token j iff j <= i < subtree_end[j]; position_ids then hold each token's depth.
        attention_mask [B, past + T]: 0 at left padding (rows of unequal length decoded together), which no
        token attends; give each row its own `position_ids`.
        """
        hidden = self.model(input_ids, position_ids, document_ids, kv_cache, subtree_end, attention_mask)
        return hidden if return_hidden else self.output_logits(hidden)

    def output_logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits [..., vocab] for final hidden states [..., hidden]."""
        return self.lm_head(hidden).float()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied matrix once; `exclude_embeddings` drops the input embedding table
        (and with it a tied lm_head), as transformers' `num_parameters` does."""
        count = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if exclude_embeddings:
            count -= self.model.embed_tokens.weight.numel()
        return count

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context `seq_len`, for an MFU estimate.

        6 per matmul parameter (the embedding lookup is no matmul; lm_head is, tied or not) plus attention
        scores and values, 12 * layers * hidden * seq_len (PaLM, appendix B; nanoGPT's estimate_mfu).
        """
        config = self.config
        matmul_params = self.num_parameters(exclude_embeddings=True)
        if config.tie_word_embeddings:
            matmul_params += config.vocab_size * config.hidden_size
        return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
