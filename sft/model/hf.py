"""Any transformers causal LM from a local directory, behind the project model's interface.

`model=hf model.path=DIR` loads `AutoModelForCausalLM.from_pretrained(DIR)` (no network, no remote code)
and wraps it in `HFCausalLM`, whose `forward(input_ids, position_ids, document_ids, kv_cache)` returns fp32
logits like `sft.model.llama.LlamaForCausalLM`, so SFTModule, generation, chat, eval and export work
unchanged. transformers (and peft, for LoRA) are the optional extra `[hf]`: imported only when used.

Packing stays invisible (DESIGN.md invariant 3): a packed row gets its per-document `position_ids`, and
`model.packed_attention` (auto by default) picks how the attention implementation keeps documents apart:
`documents` — sdpa over each document's slice (a registered attention function, no mask) or FlashAttention's
varlen kernels (`cu_seq_lens`); `flex` — a flex_attention block mask; `dense` — a 4-D block-diagonal mask
for sdpa (boolean) or eager (additive). auto is flex for flex_attention, dense for eager, else documents.
Combinations that cannot isolate documents are refused when the model is built. Rows of prefix trees
(`subtree_end`, data.prefix_sharing) take a dense tree mask under sdpa and eager and a flex tree mask under
flex_attention; FlashAttention's kernels cannot express a tree, so such a batch is refused with what to set.

Training asks for the final hidden states (`return_hidden`) and applies `output_logits` at the trained
positions only; `output_logits` repeats what the architecture does to its logits (Cohere's logit scale,
Granite's logits scaling, Gemma's final soft-capping), and a probe at build time refuses an architecture
whose logits it would not reproduce.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sft.model.attention import (
    PACKED_ATTENTION_MODES,
    PackedAttention,
    attend_per_document,
    causal_mask,
    document_block_mask,
    document_offsets,
    tree_block_mask,
    tree_mask,
)
from sft.model.llama import KVCache, cache_and_positions


class HFModelError(ValueError):
    """The `model=hf` section or directory cannot be used as asked; the message says what to change."""


@dataclass
class LoraSettings:
    """`model.lora`: a peft LoRA adapter on top of the frozen pretrained weights."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"  # peft's shorthand: every linear layer but the output head


@dataclass
class HFModelConfig:
    """The `model` section for `model=hf` (conf/model/hf.yaml)."""

    name: Literal["hf"]
    path: str  # a local directory holding config.json and the weights
    # float32 | bfloat16 | float16, or a Lightning precision ("bf16-true" loads bf16; "*-mixed" and "32-true"
    # load fp32 master weights). hf.yaml sets ${hardware.precision}.
    dtype: str | int | None = None
    attn_implementation: str | None = None  # null: transformers' default (sdpa); eager also packs
    lora: LoraSettings | None = None  # null: full fine-tuning
    vocab_size: int | None = None  # the tokenizer's, filled in by the trainer: checked, never used to resize
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (non-reentrant)
    packed_attention: PackedAttention = "auto"  # how packed rows keep documents apart (packed_mode)


EXPLICIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRUE_PRECISIONS = {
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "64-true": torch.float64,
    "64": torch.float64,
}


def load_dtype(value: str | int | None) -> torch.dtype:
    """The dtype to load the weights in. Mixed precision keeps fp32 weights (autocast computes in half);
    a `*-true` precision would convert the whole model anyway, so loading it in that dtype saves memory."""
    if value is None:
        return torch.float32
    text = str(value)
    if text in EXPLICIT_DTYPES:
        return EXPLICIT_DTYPES[text]
    return TRUE_PRECISIONS.get(text, torch.float32)


DOCUMENTS_ATTENTION = "sft_sdpa_documents"  # sdpa, per document slice when given `document_offsets`


def sdpa_per_document(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_offsets: list[int] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' sdpa, except that a packed forward (`document_offsets`) attends per document."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if document_offsets is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    window = kwargs.get("sliding_window")
    longest = max(end - start for start, end in zip(document_offsets[:-1], document_offsets[1:]))
    if kwargs.get("softcap") is not None or (window is not None and longest > window):
        raise HFModelError(
            "this model's attention soft-caps its scores, or slides a window shorter than a packed document, "
            "which per-document sdpa does not apply; use model.attn_implementation=flash_attention_2 (GPU), "
            "data.packing=false, or a protocol.max_seq_len within the window"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    output = attend_per_document(query, key, value, document_offsets, scale=scaling, dropout=dropout)
    return output.transpose(1, 2).contiguous(), None


def register_documents_attention() -> None:
    """Make DOCUMENTS_ATTENTION an attention implementation transformers knows (masks as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DOCUMENTS_ATTENTION, sdpa_per_document)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DOCUMENTS_ATTENTION, sdpa_mask)


def packed_mode(requested: str, implementation: str) -> str:
    """The packed-attention mode for an attention implementation, or HFModelError for a pair that cannot
    keep documents apart."""
    if requested not in PACKED_ATTENTION_MODES:
        raise HFModelError(
            f"model.packed_attention={requested!r}: expected one of {', '.join(PACKED_ATTENTION_MODES)}"
        )
    flash = implementation.startswith("flash_attention")
    supported = {
        "documents": implementation in ("sdpa", DOCUMENTS_ATTENTION) or flash,
        "flex": implementation == "flex_attention",
        "dense": implementation in ("sdpa", "eager"),
    }
    if requested == "auto":
        return {"flex_attention": "flex", "eager": "dense"}.get(implementation, "documents")
    if not supported[requested]:
        raise HFModelError(
            f"model.packed_attention={requested} cannot keep packed documents apart with "
            f"attn_implementation={implementation}; use packed_attention=auto, another "
            "model.attn_implementation, or data.packing=false"
        )
    return requested


def dense_packed_mask(allowed: Tensor, implementation: str) -> Tensor:
    """A 4-D mask [B, 1, T, T] for the attention implementation from `allowed` (boolean, True = attend:
    `causal_mask` of the documents, or `tree_mask`).

    sdpa takes booleans (True = attend); eager adds the mask to the scores, so it gets 0 / -inf-like floats
    (fp32: added to bf16 scores under autocast it promotes, and softmax runs in fp32 anyway). The diagonal is
    always allowed, so no row is empty.
    """
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed


class HFCausalLM(nn.Module):
    """A transformers causal LM (optionally a peft LoRA model) with the project's forward signature."""

    def __init__(self, model: nn.Module, source_path: str, packed_attention: str = "auto") -> None:
        super().__init__()
        self.model = model  # PreTrainedModel or peft.PeftModel
        self.source_path = source_path
        self.packed_attention = packed_mode(packed_attention, self.attn_implementation)

    @property
    def base_model(self) -> nn.Module:
        """The transformers model itself (inside the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def config(self):
        """The text model's config (generation reads `max_position_embeddings` from it)."""
        return self.base_model.config.get_text_config()

    @property
    def _cache_argument(self) -> str:
        """transformers 5.2x renamed `past_key_values` to `cache` (the old name warns until 5.40)."""
        parameters = inspect.signature(self.base_model.forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"

    @property
    def attn_implementation(self) -> str:
        return self.base_model.config._attn_implementation or "eager"

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
        """Logits [B, T, vocab] in fp32, or with `return_hidden` the final hidden states, with the same
        contract as `LlamaForCausalLM.forward` (`attention_mask` [B, past + T] goes to transformers as is).

        kv_cache: the project's KVCache; the transformers cache rides on it (`kv_cache.hf_cache`), created
        when `kv_cache.length` is 0, and `length` advances by the new tokens, as the project's model does.
        """
        seq_len = input_ids.shape[1]
        past, position_ids = cache_and_positions(input_ids, position_ids, document_ids, kv_cache)
        kwargs: dict[str, Any] = {"use_cache": False}
        if kv_cache is not None:
            from transformers import DynamicCache

            if past == 0 or getattr(kv_cache, "hf_cache", None) is None:
                kv_cache.hf_cache = DynamicCache(config=self.base_model.config)
            kwargs = {self._cache_argument: kv_cache.hf_cache, "use_cache": True}
        if document_ids is not None:
            kwargs.update(self.packing_arguments(document_ids))
        if subtree_end is not None:
            if kv_cache is not None or document_ids is not None:
                raise ValueError(
                    "subtree_end (prefix trees) cannot be combined with a KV cache or document_ids"
                )
            kwargs.update(self.tree_arguments(subtree_end))
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if return_hidden:
            output = self.base_model.get_decoder()(input_ids=input_ids, position_ids=position_ids, **kwargs)
        else:
            output = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        if kv_cache is not None:
            kv_cache.length += seq_len
        return output.last_hidden_state if return_hidden else output.logits.float()

    def packing_arguments(self, document_ids: Tensor) -> dict[str, Any]:
        """The forward's keyword arguments that keep a packed row's documents apart (packed_mode)."""
        if self.packed_attention == "flex":
            return {"attention_mask": document_block_mask(document_ids)}
        if self.packed_attention == "dense":
            allowed = causal_mask(document_ids.shape[1], 0, document_ids, document_ids.device)
            return {"attention_mask": dense_packed_mask(allowed, self.attn_implementation)}
        offsets = document_offsets(document_ids)
        if self.attn_implementation == DOCUMENTS_ATTENTION:
            # An all-ones padding mask lets transformers skip building any mask (sdpa's is_causal case).
            return {"attention_mask": torch.ones_like(document_ids), "document_offsets": offsets.tolist()}
        longest = int(offsets.diff().max())
        return {
            "cu_seq_lens_q": offsets,
            "cu_seq_lens_k": offsets,
            "max_length_q": longest,
            "max_length_k": longest,
        }

    def tree_arguments(self, subtree_end: Tensor) -> dict[str, Any]:
        """The forward's keyword arguments for rows of prefix trees (sft.data.collate)."""
        implementation = self.attn_implementation
        if implementation == "flex_attention":
            return {"attention_mask": tree_block_mask(subtree_end)}
        if implementation in ("sdpa", "eager", DOCUMENTS_ATTENTION):  # the last is sdpa given a mask
            return {"attention_mask": dense_packed_mask(tree_mask(subtree_end), implementation)}
        raise HFModelError(
            f"attn_implementation={implementation} cannot attend over a prefix tree (a split conversation's "
            "rows packed with their history once); set data.prefix_sharing=false, or use "
            "model.attn_implementation=sdpa, eager or flex_attention"
        )

    def output_logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits for final hidden states, as the architecture computes them from its output head."""
        model = self.base_model
        logits = model.get_output_embeddings()(hidden)
        if (scale := getattr(model, "logit_scale", None)) is not None:  # Cohere
            logits = logits * scale
        if divisor := getattr(model.config, "logits_scaling", None):  # Granite
            logits = logits / divisor
        if cap := getattr(model.config, "final_logit_softcapping", None):  # Gemma 2 and 3
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def check_output_logits(self) -> None:
        """Refuse an architecture whose logits `output_logits` does not reproduce (on an 8-token probe)."""
        vocab = self.base_model.get_input_embeddings().num_embeddings
        device = self.base_model.get_input_embeddings().weight.device
        probe = torch.arange(8, device=device)[None] % vocab
        with torch.no_grad():
            expected = self.model(input_ids=probe, use_cache=False).logits.float()
            got = self.output_logits(self(probe, return_hidden=True))
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max().clamp_min(1))):
            raise HFModelError(
                f"{type(self.base_model).__name__} computes its logits from the hidden states in a way sft's "
                "trained-position loss does not reproduce; it cannot be fine-tuned with model=hf yet"
            )

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, as `LlamaForCausalLM.flops_per_token` estimates them (6 per matmul
        parameter, the input embedding excluded, plus attention); LoRA's frozen weights still run forward
        and backward through activations, so the estimate keeps them."""
        config = self.config
        embedding = self.base_model.get_input_embeddings().weight
        matmul_params = sum(p.numel() for p in self.base_model.parameters()) - embedding.numel()
        if getattr(config, "tie_word_embeddings", False):
            matmul_params += embedding.numel()
        return 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len

    def save_adapter(self, directory: str | Path) -> Path:
        """The LoRA adapter on its own (adapter_config.json + adapter_model.safetensors), loadable with
        `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model.path), directory)`."""
        if not self.is_lora:
            raise HFModelError("save_adapter: this model has no LoRA adapter (model.lora is null)")
        self.model.save_pretrained(str(directory))
        return Path(directory)

    def merged_model(self) -> nn.Module:
        """The transformers model with any LoRA adapter folded into its weights (a copy: self keeps it)."""
        import copy

        if not self.is_lora:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()


def build_hf_model(config: HFModelConfig) -> HFCausalLM:
    """The model for `model=hf`: the pretrained weights from `config.path`, LoRA-wrapped when `lora` is set.

    `vocab_size` (the tokenizer's) never resizes the model: the checkpoint's embedding rows rule, and a
    tokenizer with ids beyond them is refused.
    """
    path = Path(config.path)
    if not (path / "config.json").is_file():
        raise HFModelError(
            f"model.path={path}: no config.json there; give a local transformers model directory"
        )
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        raise HFModelError("model=hf needs transformers: pip install 'sft[hf]'") from error
    options: dict[str, Any] = {"dtype": load_dtype(config.dtype), "local_files_only": True}
    if config.attn_implementation is not None:
        options["attn_implementation"] = config.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path), **options)
    implementation = model.config._attn_implementation or "eager"
    if packed_mode(config.packed_attention, implementation) == "documents" and implementation == "sdpa":
        register_documents_attention()
        model.set_attn_implementation(DOCUMENTS_ATTENTION)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    rows = model.get_input_embeddings().num_embeddings
    if config.vocab_size is not None and config.vocab_size > rows:
        raise HFModelError(
            f"the tokenizer has {config.vocab_size} ids but {path}'s embedding has only {rows} rows; use the "
            f"tokenizer that belongs to the model (tokenizer.path={path})"
        )
    lora = config.lora
    if lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:
            raise HFModelError("model.lora needs peft: pip install 'sft[hf]'") from error
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
    wrapped = HFCausalLM(model, str(path), config.packed_attention)
    wrapped.check_output_logits()  # in eval mode (from_pretrained's): no dropout in the probe
    return wrapped.train()  # dropout on for training
