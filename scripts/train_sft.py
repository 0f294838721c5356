"""Thin entry script: `python scripts/train_sft.py [overrides]` is `sft-train [overrides]`."""

from sft.cli.train import main

if __name__ == "__main__":
    main()
