"""Peak memory and speed of one optimizer step at real vocabulary size: sft before/after, and TRL.

    .venv/bin/python scripts/bench_memory_model.py [--tokens 1024 4096 16384] [--skip-trl]  # '.[bench]'

The model is Qwen2-shaped and random (vocab 151,936, 2 layers, hidden 256, 4 heads / 2 k/v heads, tied
embeddings), built locally with transformers: nothing is downloaded. Each row of data is one packed row of
N tokens: documents of random lengths laid end to end, the first ~30% of each a prompt (not trained), the
rest trained, as sft's packing lays them out. Every configuration runs in a FRESH subprocess that builds the
model and takes one fp32 optimizer step (AdamW) on one row; the figure is the process's peak RSS (VmHWM:
model, optimizer state, activations, imports), the time is that step's wall time.

sft runs SFTModule under lightning.Trainer with `model=hf`:
- before: the full-logits loss (the model's [1, N, vocab] logits, cross-entropy over all positions), what
  sft did before the trained-position loss;
- after: the trained-position loss in chunks of `optim.loss_chunk_tokens` (sft.loss);
each with packed documents kept apart by the dense [N, N] mask or per-document attention, and the last
also with activation checkpointing. TRL runs SFTTrainer on the same model directory and the same documents
(pre-tokenized `input_ids` + `labels`, packing=True at max_length=N, batch 1, fp32, otherwise TRL's
defaults: its fused LM head and gradient checkpointing on). The losses of one row agree across all.
Timings on a machine shared with other work are not reliable; memory is.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VOCAB = 151_936
MODEL_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32_768,
    tie_word_embeddings=True,
)
SFT_CONFIGS = [  # (loss path, packed attention, activation checkpointing)
    ("before", "dense", False),
    ("before", "documents", False),
    ("after", "dense", False),
    ("after", "documents", False),
    ("after", "documents", True),
]
BEFORE_MAX_TOKENS = 4096  # the full logits at 16k would take ~30 GB
DENSE_MAX_TOKENS = 4096  # the dense mask's attention probabilities at 16k: several GB per layer


def peak_rss_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) / 2**20


def build_model_dir(directory: Path) -> Path:
    """The random Qwen2-shaped model, with a minimal tokenizer (TRL needs a pad token; ids are given)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL_SHAPE))
    model.save_pretrained(directory)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(directory)
    return directory


def documents(tokens: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Documents whose lengths add up to exactly `tokens` (so they pack into one row), with labels."""
    import random

    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(tokens // 16, tokens // 4), tokens - sum(lengths)))
    result = []
    for length in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        prompt = max(1, int(0.3 * length))  # the first token is never a target, as in sft's rows
        result.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return result


def sft_batch(tokens: int):
    import torch

    docs = documents(tokens)
    cat = lambda key: torch.tensor([[value for doc in docs for value in doc[key]]])  # noqa: E731
    positions = [p for doc in docs for p in range(len(doc["input_ids"]))]
    doc_ids = [d for d, doc in enumerate(docs) for _ in doc["input_ids"]]
    return {
        "input_ids": cat("input_ids"),
        "labels": cat("labels"),
        "position_ids": torch.tensor([positions]),
        "document_ids": torch.tensor([doc_ids]),
        "real_tokens": torch.tensor(tokens),
    }


def run_sft(model_dir: str, tokens: int, loss_path: str, attention: str, checkpointing: bool) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from sft.loss import full_logits_loss_sum
    from sft.module import SFTModule

    class FullLogitsModule(SFTModule):
        """The loss as sft computed it before: full [B, T, vocab] logits, cross-entropy everywhere."""

        def loss_sum(self, batch):
            logits = self.model(
                batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
            )
            return full_logits_loss_sum(logits, batch["labels"])

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seconds = time.perf_counter() - self.started
            self.loss = float(trainer.callback_metrics["train/loss"])

    model_config = {
        "name": "hf",
        "path": model_dir,
        "dtype": "float32",
        "packed_attention": attention,
        "activation_checkpointing": checkpointing,
    }
    optim_config = {
        "lr": 1e-4,
        "weight_decay": 0.0,
        "warmup_steps": 1,
        "grad_clip": 1.0,
        "loss_chunk_tokens": 1024,
    }
    torch.manual_seed(0)
    module = (FullLogitsModule if loss_path == "before" else SFTModule)(model_config, optim_config)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=DataLoader([sft_batch(tokens)], batch_size=None))
    return {"seconds": timer.seconds, "loss": timer.loss}


def run_trl(model_dir: str, tokens: int) -> dict:
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        packing=True,
        max_length=tokens,
        bf16=False,
        fp16=False,
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(documents(tokens)),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
        callbacks=[timer],
    )
    trainer.train()
    return {"seconds": timer.seconds, "loss": timer.loss}


def child(spec: dict) -> None:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    if spec["side"] == "trl":
        result = run_trl(spec["model_dir"], spec["tokens"])
    else:
        result = run_sft(
            spec["model_dir"], spec["tokens"], spec["loss_path"], spec["attention"], spec["checkpointing"]
        )
    print("RESULT " + json.dumps({**spec, **result, "peak_gb": peak_rss_gb()}), flush=True)


def measure(spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    finished = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("RESULT ")]
    if finished.returncode or not lines:
        return {**spec, "error": (finished.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1][len("RESULT ") :])


def attention_timings(tokens: int, document_counts: list[int], heads: int = 4, head_dim: int = 64) -> None:
    """Forward + backward of one attention call on a packed row: the dense mask against per-document SDPA
    (sft.model.attention), the largest difference between their outputs and gradients beside."""
    import torch

    from sft.model.attention import AttentionPlan, attend, causal_mask, document_offsets

    print(
        f"\n| documents in a {tokens:,}-token row | dense mask (s) | per-document (s) | speed-up | max diff |"
    )
    print("|---:|---:|---:|---:|---:|")
    for count in document_counts:
        document_ids = torch.arange(tokens)[None] * count // tokens  # `count` equal documents
        plans = {
            "dense": AttentionPlan(mask=causal_mask(tokens, 0, document_ids, torch.device("cpu"))),
            "documents": AttentionPlan(document_offsets=document_offsets(document_ids).tolist()),
        }
        seconds, results = {}, {}
        for name, plan in plans.items():
            generator = torch.Generator().manual_seed(0)
            q, k, v = (
                torch.randn(1, heads, tokens, head_dim, generator=generator, requires_grad=True)
                for _ in "qkv"
            )
            started = time.perf_counter()
            output = attend(q, k, v, plan)
            output.square().sum().backward()
            seconds[name] = time.perf_counter() - started
            results[name] = [output.detach(), q.grad, k.grad, v.grad]
        difference = max(float((a - b).abs().max()) for a, b in zip(results["dense"], results["documents"]))
        print(
            f"| {count} | {seconds['dense']:.3f} | {seconds['documents']:.3f} | "
            f"{seconds['dense'] / seconds['documents']:.1f}x | {difference:.1e} |",
            flush=True,
        )


def label(result: dict) -> str:
    if result["side"] == "trl":
        return "TRL SFTTrainer (fused LM head, grad. checkpointing)"
    attention = "per-document" if result["attention"] == "documents" else "dense mask"
    checkpointing = " + act. checkpointing" if result["checkpointing"] else ""
    return f"sft {result['loss_path']}: {attention}{checkpointing}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--attention-only", action="store_true", help="only the attention timings")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a busy machine")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.attention_only:
        return attention_timings(4096, [4, 16, 64])
    with tempfile.TemporaryDirectory() as directory:
        model_dir = str(build_model_dir(Path(directory)))
        print("| tokens/row | configuration | peak RSS (GB) | step (s) | tokens/s | loss |")
        print("|---:|---|---:|---:|---:|---:|")
        for tokens in args.tokens:
            specs = [
                {"side": "sft", "loss_path": path, "attention": attention, "checkpointing": checkpointing}
                for path, attention, checkpointing in SFT_CONFIGS
                if not (path == "before" and tokens > BEFORE_MAX_TOKENS)
                and not (attention == "dense" and tokens > DENSE_MAX_TOKENS)
            ]
            if not args.skip_trl:
                specs.append({"side": "trl"})
            for spec in specs:
                result = measure({**spec, "tokens": tokens, "model_dir": model_dir, "threads": args.threads})
                if "error" in result:
                    print(f"| {tokens:,} | {label(result)} | failed: {result['error']} | | | |", flush=True)
                    continue
                print(
                    f"| {tokens:,} | {label(result)} | {result['peak_gb']:.2f} | {result['seconds']:.1f} | "
                    f"{tokens / result['seconds']:,.0f} | {result['loss']:.6f} |",
                    flush=True,
                )
    attention_timings(4096, [4, 16, 64])


if __name__ == "__main__":
    main()
