"""A trained checkpoint as a standard Hugging Face Llama directory, loadable without this package.

    out/config.json              LlamaConfig, with bos/eos/pad ids from the tokenizer (eos = end-of-turn)
    out/model.safetensors        the weights under HF's names (a tied lm_head is stored once, as HF does)
    out/tokenizer.json           the training tokenizer, unchanged
    out/tokenizer_config.json    special tokens and the chat template (also in chat_template.jinja)
    out/generation_config.json   eos_token_id = the end-of-turn id, so generation stops where training taught

The chat template is a Jinja source that renders byte-identically to the training template: builtins are
translated field by field (with `{% generation %}` around the trained part, so transformers'
`return_assistant_tokens_mask` marks exactly the tokens we trained), Jinja templates keep their source.
`export_checkpoint` renders a probe conversation both ways and refuses to write a template that differs.
transformers itself is not needed to export the project's models. A `model=hf` checkpoint is written by
the fine-tuned transformers model's own `save_pretrained` (any architecture; a LoRA adapter merged in, or
with `merge=False` the adapter alone), with the same tokenizer, template and generation files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from sft.atomic import atomic_directory
from sft.checkpoint import InferenceBundle, load_for_inference
from sft.model.hf import HFCausalLM
from sft.protocol.templates import (
    BuiltinTemplate,
    ChatTemplate,
    JinjaTemplate,
    builtin_jinja_source,
    probe_conversation,
)
from sft.protocol.templates.builtin import jinja_literal
from sft.protocol.types import TemplateError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked; the message says what to change."""


def _jinja_value(value: Any) -> str:
    """A Python value as a Jinja literal, for template kwargs baked into the exported source."""
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return jinja_literal(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_jinja_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{jinja_literal(str(k))}: {_jinja_value(v)}" for k, v in value.items()) + "}"
    raise ExportError(f"template.kwargs value {value!r} cannot be written into a chat template")


def chat_template_source(template: ChatTemplate, generation_tags: bool = True) -> str:
    """The Jinja source to ship. A Jinja template's training kwargs (e.g. enable_thinking=false) become
    defaults that a caller of `apply_chat_template` may still override."""
    if isinstance(template, BuiltinTemplate):
        return builtin_jinja_source(template, generation_tags)
    if not isinstance(template, JinjaTemplate):
        raise ExportError(f"template {template.name!r}: no Jinja equivalent is known for this template type")
    defaults = "".join(
        f"{{%- if {key} is not defined %}}{{%- set {key} = {_jinja_value(value)} %}}{{%- endif %}}"
        for key, value in template.template_kwargs.items()
    )
    source = defaults + template.source
    return source if generation_tags else _GENERATION_TAG.sub("", source)


def special_tokens(template: ChatTemplate) -> tuple[str | None, str]:
    """(bos, eos) as the exported tokenizer declares them. eos is what the template calls eos_token when
    it uses one (it renders with it), else the end-of-turn marker."""
    if isinstance(template, BuiltinTemplate):
        return template.bos or None, template.eot
    return template.bos_token, template.eos_token or template.eot


def check_chat_template(source: str, template: ChatTemplate, bos: str | None, eos: str) -> None:
    """Render the start-up probe conversation (with its tools, reasoning and tool call, and every generation
    prompt in it) with `source` the way transformers will, and with the training template; raise
    ExportError unless the texts are identical and the rows and trained spans too."""
    date = template.date.isoformat() if isinstance(template, JinjaTemplate) else None
    exported = JinjaTemplate(
        source,
        eot=list(template.eot_markers),
        stop=list(template.stop_tokens),
        bos_token=bos,
        eos_token=eos,
        **({"date": date} if date else {}),
    )
    messages, tools, _ = probe_conversation(template)
    cases = [(messages, False)] + [
        (messages[:index], True) for index, message in enumerate(messages) if message.role == "assistant"
    ]
    try:
        for case, add_generation_prompt in cases:
            ours = template.render_text(case, tools, add_generation_prompt)
            theirs = exported.render_text(case, tools, add_generation_prompt)
            if ours != theirs:
                raise ExportError(
                    f"the exported chat template renders {theirs!r} where training rendered {ours!r}"
                    f" ({len(case)} messages, add_generation_prompt={add_generation_prompt})"
                )
        ours_rows, theirs_rows = template.render_rows(messages, tools), exported.render_rows(messages, tools)
    except TemplateError as error:
        raise ExportError(
            f"the exported chat template cannot render the probe conversation: {error}"
        ) from error
    trained = [(row.text, row.assistant_spans) for row in ours_rows]
    if trained != [(row.text, row.assistant_spans) for row in theirs_rows]:
        raise ExportError(
            f"the exported chat template trains {[(r.text, r.assistant_spans) for r in theirs_rows]} where "
            f"training trained {trained}"
        )


def _token_id(tokenizer: Tokenizer, token: str | None) -> int | None:
    if token is None:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ExportError(f"the tokenizer has no id for {token!r}, which the exported template needs")
    return token_id


def export_files(
    bundle: InferenceBundle, dtype: str = "float32", generation_tags: bool = True, merge: bool = True
) -> dict[str, Any]:
    """{file name: content}: JSON-able dicts, strings, for model.safetensors the tensors to save, or for
    `model=hf` under "model" a transformers (or peft, `merge=False`) model whose save_pretrained writes the
    weights and config.json."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    template, tokenizer = bundle.template, bundle.tokenizer
    source = chat_template_source(template, generation_tags)
    bos, eos = special_tokens(template)
    check_chat_template(source, template, bos, eos)
    bos_id, eos_id, eot_id = (_token_id(tokenizer, token) for token in (bos, eos, template.eot))
    # Padding with the end-of-turn token is masked by the attention mask wherever transformers pads.
    ids = {"bos_token_id": bos_id, "eos_token_id": eot_id, "pad_token_id": eot_id}

    model_config = bundle.model.config
    stop_ids = list(dict.fromkeys([_token_id(tokenizer, token) for token in template.stop_tokens] + [eos_id]))
    stop_ids = stop_ids[0] if len(stop_ids) == 1 else stop_ids  # e.g. GPT-OSS: <|return|> and <|call|>
    # Greedy by default, as sft-chat and sft-eval decode (transformers' pipeline would otherwise sample).
    generation_config = {"eos_token_id": stop_ids, "pad_token_id": eot_id, "do_sample": False}
    if bos_id is not None:
        generation_config["bos_token_id"] = bos_id
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # plain tokenizer.json; transformers 4 and 5 load it
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": template.eot,
        "add_bos_token": False,  # the template writes any BOS itself; a second one would shift every id
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the trained text, spaces included
        "model_max_length": getattr(model_config, "max_position_embeddings", None),
        "chat_template": source,
    }
    files = {
        "generation_config.json": generation_config,
        "tokenizer.json": tokenizer.to_str(),
        "tokenizer_config.json": tokenizer_config,
        "chat_template.jinja": source,  # recent transformers read this file in preference
    }
    if isinstance(bundle.model, HFCausalLM):
        return {"model": hf_export_model(bundle.model, ids, dtype, merge), **files}
    config = {**model_config.to_hf_dict(), **ids, "torch_dtype": dtype, "dtype": dtype}
    state = bundle.model.state_dict()
    if model_config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same tensor as embed_tokens; safetensors refuses shared storage
    tensors = {name: tensor.detach().to("cpu", DTYPES[dtype]).contiguous() for name, tensor in state.items()}
    return {"config.json": config, "model.safetensors": tensors, **files}


def hf_export_model(
    model: HFCausalLM, ids: dict[str, int | None], dtype: str, merge: bool
) -> torch.nn.Module:
    """What `save_pretrained` writes for `model=hf`: the fine-tuned transformers model (LoRA merged into
    the weights), or with `merge=False` the PeftModel, whose save_pretrained writes the adapter alone."""
    if merge or not model.is_lora:
        exported = model.merged_model()
        for key, value in ids.items():  # the tokenizer's ids, eos = end-of-turn, as for the project's models
            setattr(exported.config.get_text_config(), key, value)
            setattr(exported.config, key, value)
    else:
        exported = model.model
    return exported.to(DTYPES[dtype])


def give_normal_permissions(directory: Path) -> None:
    """Files as any file the user writes (0666 less the umask): safetensors writes its file 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export_checkpoint(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    generation_tags: bool = True,
    merge: bool = True,
) -> Path:
    """Write the export directory `out` (which must not exist or be empty) all at once: files go to a
    temporary sibling that is renamed into place, so an interrupted export leaves nothing half-written.

    `merge` (model=hf with LoRA only): fold the adapter into the weights (default), or write the adapter
    alone (adapter_config.json + adapter_model.safetensors, over the base model at `model.path`)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"out={out} exists and is not an empty directory; choose a new one or remove it")
    files = export_files(load_for_inference(ckpt), dtype, generation_tags, merge)
    with atomic_directory(out) as staging:
        for name, content in files.items():
            if name == "model":  # first: our generation_config.json then replaces the model's own
                content.save_pretrained(staging)
            elif name == "model.safetensors":
                save_file(content, staging / name, metadata={"format": "pt"})
            elif isinstance(content, dict):
                (staging / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", "utf-8")
            else:
                (staging / name).write_text(content, encoding="utf-8")
        give_normal_permissions(staging)
    return out
