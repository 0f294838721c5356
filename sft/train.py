"""`python -m sft.train`: the same as `sft-train`."""

from sft.cli.train import main

if __name__ == "__main__":
    main()
