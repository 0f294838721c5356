"""Any transformers causal LM from a local directory, behind the project model's interface.

`model=hf model.path=DIR` loads `AutoModelForCausalLM.from_pretrained(DIR)` (no network, no remote code)
and wraps it in `HFCausalLM`, whose `forward(input_ids, position_ids, document_ids, kv_cache)` returns fp32
logits like `sft.model.llama.LlamaForCausalLM`, so SFTModule, generation, chat, eval and export work
unchanged. transformers (and peft, for LoRA) are the optional extra `[hf]`: imported only when used.

Packing stays invisible (DESIGN.md invariant 3): a packed row gets its per-document `position_ids` and a
4-D block-diagonal causal mask built from `document_ids`, which transformers 5 passes through untouched
(a boolean mask for sdpa, an additive float mask for eager). Attention implementations that cannot take
such a mask (flash attention over a batch, flex) refuse packed rows with a message instead of silently
letting documents see each other.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sft.model.llama import KVCache, attention_mask, cache_and_positions


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


def packed_attention_mask(document_ids: Tensor, implementation: str) -> Tensor:
    """A 4-D mask [B, 1, T, T] in which a token sees only the earlier tokens of its own document.

    sdpa takes booleans (True = attend); eager adds the mask to the scores, so it gets 0 / -inf-like floats
    (fp32: added to bf16 scores under autocast it promotes, and softmax runs in fp32 anyway). The diagonal is
    always allowed, so no row is empty.
    """
    allowed = attention_mask(document_ids.shape[1], 0, document_ids, document_ids.device)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(torch.float32).min)
    raise HFModelError(
        f"packed rows need a 4-D attention mask, which attn_implementation={implementation!r} does not take "
        "here; use model.attn_implementation=sdpa (or eager), or data.packing=false"
    )


class HFCausalLM(nn.Module):
    """A transformers causal LM (optionally a peft LoRA model) with the project's forward signature."""

    def __init__(self, model: nn.Module, source_path: str) -> None:
        super().__init__()
        self.model = model  # PreTrainedModel or peft.PeftModel
        self.source_path = source_path

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
    ) -> Tensor:
        """Logits [B, T, vocab] in fp32, with the same contract as `LlamaForCausalLM.forward`.

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
            kwargs["attention_mask"] = packed_attention_mask(document_ids, self.attn_implementation)
        output = self.model(input_ids=input_ids, position_ids=position_ids, **kwargs)
        if kv_cache is not None:
            kv_cache.length += seq_len
        return output.logits.float()

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
    return HFCausalLM(model.train(), str(path))  # from_pretrained returns eval mode: dropout would be off
