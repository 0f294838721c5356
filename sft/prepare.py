"""`python -m sft.prepare`: the same as `sft-prepare`."""

from sft.cli.prepare import main

if __name__ == "__main__":
    main()
