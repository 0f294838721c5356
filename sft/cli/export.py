"""sft-export: a checkpoint as a Hugging Face directory for transformers, vLLM and llama.cpp's converter.

    sft-export ckpt=outputs/RUN/checkpoints/last.ckpt out=exported
    sft-export ckpt=... out=exported-gguf generation_tags=false   # for llama.cpp's Jinja engine

The README shows how to serve the result.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from sft.checkpoint import CheckpointError
from sft.export import ExportError, export_checkpoint


@hydra.main(version_base="1.3", config_path="pkg://sft.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        out = export_checkpoint(
            cfg.ckpt, cfg.out, dtype=cfg.dtype, generation_tags=cfg.generation_tags, merge=cfg.merge
        )
    except (CheckpointError, ExportError, FileNotFoundError) as error:
        sys.exit(f"sft-export: {error}")
    for path in sorted(out.iterdir()):
        print(f"{path}  ({path.stat().st_size:,} bytes)")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
