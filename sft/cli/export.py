"""sft-export: a checkpoint as a Hugging Face directory for transformers, vLLM and llama.cpp's converter.

    sft-export ckpt=outputs/RUN/checkpoints/last.ckpt out=exported
    sft-export ckpt=... out=exported-gguf generation_tags=false   # for llama.cpp's Jinja engine

The README shows how to serve the result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from omegaconf import DictConfig

from sft.checkpoint import CheckpointError
from sft.cli.entry import run_cli
from sft.config import register_defaults
from sft.export import ExportError, export_checkpoint


@dataclass
class ExportConfig:
    """conf/export.yaml."""

    ckpt: str  # an sft-train checkpoint (.ckpt)
    out: str  # the directory to create (must not exist, or be empty)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    generation_tags: bool = (
        True  # keep {% generation %} in the chat template (false for engines rejecting it)
    )
    merge: bool = True  # model=hf with LoRA: fold the adapter into the weights (false: the adapter alone)


register_defaults("sft_export_defaults", ExportConfig)


def run(config: ExportConfig, cfg: DictConfig) -> None:
    try:
        out = export_checkpoint(
            config.ckpt,
            config.out,
            dtype=config.dtype,
            generation_tags=config.generation_tags,
            merge=config.merge,
        )
    except (CheckpointError, ExportError, FileNotFoundError) as error:
        sys.exit(f"sft-export: {error}")
    for path in sorted(out.iterdir()):
        print(f"{path}  ({path.stat().st_size:,} bytes)")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})")


def main() -> None:
    run_cli("sft-export", "export", ExportConfig, run)


if __name__ == "__main__":
    main()
