"""The pipeline's own work beside bare encode_batch's, in instructions counted by callgrind.

    .venv/bin/python scripts/bench_own_work.py [--conversations 350] [--real-data ../shared/data]

Wall time on a shared 2-core machine moves by 10% from run to run; instruction counts do not, so a change
to the pipeline's Python can be judged by them. "ours" is the whole pipeline (read, validate, render,
label) with the tokenizer's results made beforehand (bench_protocol.Replay), and whole (tokenizing too);
"bare" is encode_batch (and encode_batch_fast) of the same rendered texts on one thread, ids read. Each
is counted in a child run under callgrind twice, with 0 and 2 passes over the data: half the difference
is one pass, without start-up. Needs valgrind.
"""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_protocol, beside this script

from bench_protocol import REAL_DATA, Replay, real_records, run_bare, run_ours  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from sft.protocol.pipeline import ConversationEncoder, read_conversations  # noqa: E402
from sft.protocol.templates import BUILTINS  # noqa: E402
from sft.protocol.tokenizer import train_bpe  # noqa: E402
from sft.protocol.types import Conversation, ProtocolConfig  # noqa: E402

CONFIG = ProtocolConfig(max_seq_len=1 << 30, on_error="skip")
METHODS = {
    "ours": "ours, replayed tokens",
    "whole": "ours, whole",
    "encode_batch": "bare encode_batch",
    "encode_batch_fast": "bare encode_batch_fast",
}


def prepare(folder: Path, real_data: Path, count: int) -> int:
    """The first `count` conversations, a byte-level BPE of 8192 trained on them and their encodings,
    written to `folder`; how many conversations there are."""
    lines = real_records(real_data, 1)[:count]
    if not lines:
        raise SystemExit(f"no data sets in {real_data}: give --real-data")
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    chatml = BUILTINS["chatml"]
    rendering = ConversationEncoder(None, chatml, ProtocolConfig(special_in_content="allow"))
    texts = [
        row.rendered.text
        for item in read_conversations(str(folder / "data.jsonl"))
        if isinstance(item, Conversation)
        for row in rendering.prepare(item, 0)[1]
    ]
    tokenizer = train_bpe(texts, 8192, chatml.special_tokens)
    tokenizer.save(str(folder / "tokenizer.json"))
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    (folder / "encodings.pkl").write_bytes(pickle.dumps(dict(zip(texts, encodings, strict=True))))
    return len(lines)


def child(folder: Path, method: str, passes: int) -> None:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encodings = pickle.loads((folder / "encodings.pkl").read_bytes())
    replay = Replay.__new__(Replay)  # its encodings made beforehand, not re-encoded here
    replay.tokenizer, replay.encodings = tokenizer, encodings
    encoder = ConversationEncoder(replay if method == "ours" else tokenizer, BUILTINS["chatml"], CONFIG)
    texts = list(encodings)
    for _ in range(passes):
        if method in ("ours", "whole"):
            run_ours(encoder, str(folder / "data.jsonl"))
        else:
            run_bare(tokenizer, texts, method)


def instructions(folder: Path, method: str, passes: int) -> int:
    """Instructions of a child run under callgrind (the tokenizer on one thread)."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
    command += [__file__, "--child", method, str(passes), str(folder)]
    environment = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stderr
    [line] = [line for line in output.splitlines() if "Collected :" in line]
    return int(line.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=350, help="the first N of the real data")
    parser.add_argument("--real-data", type=Path, default=REAL_DATA)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, passes, folder = args.child
        child(Path(folder), method, int(passes))
        return
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        count = prepare(folder, args.real_data, args.conversations)
        per_pass = {
            method: (instructions(folder, method, 2) - instructions(folder, method, 0)) // 2
            for method in METHODS
        }
    bare = per_pass["encode_batch"]
    print(f"{count} conversations, one pass (callgrind instructions; ratio to bare encode_batch):")
    for method, label in METHODS.items():
        counted = per_pass[method]
        print(
            f"  {label:24s} {counted / 1e6:8.1f} M  {counted / count / 1e3:7.1f} k per conversation  "
            f"{counted / bare:.3f}"
        )


if __name__ == "__main__":
    main()
