"""What several test modules share: tiny tokenizers trained in-process, checkpoints written as sft-train
writes them, a tiny transformers model directory, and the real entry points run in subprocesses. Test
modules import shared code from here only, never from one another."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from sft.cli.inspect import BOUNDARY, TRAINED_CLOSE, TRAINED_OPEN
from sft.data.datamodule import collate_rows
from sft.evaluate import prompt_ids
from sft.model.generate import generate
from sft.model.llama import LlamaConfig, LlamaForCausalLM
from sft.module import SFTModule
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.templates import BUILTINS

# ---- tokenizers -----------------------------------------------------------------------------------------

CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Reverse the list 3 1 2 -> 2 1 3. Sort it: 1 2 3.",
    "system user assistant tool You are a helpful assistant.",
    "Ünïcödé text, emoji 🙂, 中文字符, tabs\tand\nnewlines.",
    # whitespace runs, so that the tokenizer learns merges like "\n\n" and "  " that could cross a boundary
    "<|im_start|>assistant\n\n\n  indented\n\n\tcode\n    more  spaces\n\n<|im_end|>\n\n",
] * 4

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MICROLM_SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|endoftext|>"]
ALL_SPECIALS = sorted(set(CHATML_SPECIALS + LLAMA3_SPECIALS + MICROLM_SPECIALS))


def make_tokenizer(special_tokens=ALL_SPECIALS, vocab_size: int = 400, corpus=CORPUS):
    from sft.protocol.tokenizer import train_bpe

    return train_bpe(corpus, vocab_size=vocab_size, special_tokens=list(special_tokens))


# ---- sft-prepare's inputs: records in every supported format, and what chatml renders of them -----------

A = [
    {
        "messages": [
            {"role": "user", "content": "Hello, how are you?"},
            {"role": "assistant", "content": "Fine."},
        ]
    },
    {"conversations": [{"from": "human", "value": "Sort 3 1 2"}, {"from": "gpt", "value": "1 2 3"}]},
]
B = [
    {"instruction": "Reverse the list", "input": "3 1 2", "output": "2 1 3"},
    {"prompt": "Ünïcödé 🙂?", "completion": " 中文字符\n\n"},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "The quick brown fox?"},
            {"role": "assistant", "content": "Jumps."},
            {"role": "user", "content": "Over?"},
            {"role": "assistant", "content": "The lazy dog."},
        ]
    },
]
# What chatml renders for each record above, as (role, content) turns.
TURNS = [
    [("user", "Hello, how are you?"), ("assistant", "Fine.")],
    [("user", "Sort 3 1 2"), ("assistant", "1 2 3")],
    [("user", "Reverse the list\n\n3 1 2"), ("assistant", "2 1 3")],
    [("user", "Ünïcödé 🙂?"), ("assistant", " 中文字符\n\n")],
    [(m["role"], m["content"]) for m in B[2]["messages"]],
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run_prepare(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sft.prepare", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)


def contract(files, tmp_path, *extra: str) -> list[str]:
    return [
        f"data.train=[{files['a']},{files['b']}]",
        "tokenizer=file",
        f"tokenizer.path={files['tok']}",
        "template=chatml",
        "protocol.system_prompt=null",
        "protocol.max_seq_len=4096",
        f"data.cache_dir={files['cache']}",
        f"export={tmp_path / 'out.jsonl'}",
        *extra,
    ]


def make_read_only(monkeypatch) -> None:
    """Every file preparation opens to write or lock fails as on a read-only mount (root, as in CI
    containers, ignores file modes)."""
    import errno

    from sft.data import build, ranks

    def read_only_open(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, mode, *args, **kwargs)

    for module in (build, ranks):
        monkeypatch.setattr(module, "open", read_only_open, raising=False)


# ---- stock chat templates (trl's wheel) and what a model writes for a message ---------------------------


def stock_template_source(name: str) -> str:
    """trl's stock `{name}.jinja`, read from the installed wheel (the test is skipped without trl)."""
    import importlib.resources

    import pytest

    pytest.importorskip("trl")
    return Path(str(importlib.resources.files("trl") / "chat_templates" / f"{name}.jinja")).read_text()


def stock_template(name: str, eot: list[str], stop: list[str] | None = None):
    """trl's stock `{name}.jinja` as a JinjaTemplate (the test is skipped without trl)."""
    from sft.protocol.templates import JinjaTemplate

    return JinjaTemplate(stock_template_source(name), eot=eot, stop=stop, origin=name)


def generated_reply(template, message) -> str:
    """What the model writes for `message` after a user turn, up to (without) the token it stops at."""
    from sft.protocol.types import Message

    history = [Message("user", "Weather in Bern?")]
    prompt = template.render_text(history, None, True)
    text = template.render_text([*history, message])
    assert text.startswith(prompt)
    reply = text[len(prompt) :]
    return reply[: min(reply.find(stop) % (len(reply) + 1) for stop in template.stop_tokens)]


# ---- sft-inspect's output -----------------------------------------------------------------------------


def trained_runs(text: str) -> list[str]:
    return [
        run.replace(BOUNDARY, "") for run in re.findall(f"{TRAINED_OPEN}(.*?){TRAINED_CLOSE}", text, re.S)
    ]


# ---- checkpoints ----------------------------------------------------------------------------------------

TINY_MODEL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,  # peaked logits: greedy continuations vary from token to token
    "tie_word_embeddings": False,
}


def write_checkpoint(path: Path, tokenizer, template: dict | str = "chatml", steer=None, **model) -> Path:
    """A checkpoint as sft-train writes it: the module's state_dict (`model.` keys), its hyper_parameters and
    the `sft` entry of `on_save_checkpoint`. `steer(model)` may edit the weights first."""
    torch.manual_seed(0)
    model_config = {**TINY_MODEL, **model, "vocab_size": tokenizer.get_vocab_size()}
    module = SFTModule(model_config, {"lr": 1e-3, "weight_decay": 0.0})
    module.attach(tokenizer, {"name": template} if isinstance(template, str) else template)
    if steer is not None:
        steer(module.model)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def steer_to_stop(model, prompt: list[int], stop_id: int, min_reply: int = 2) -> list[int]:
    """Make greedy decoding of `prompt` emit `stop_id` after a few ordinary tokens; return those tokens.

    Swapping two rows of the (untied) lm_head swaps those two tokens' logits and nothing else, so the
    greedy run is unchanged until the first step whose argmax was the swapped-in token."""
    free_run = generate(model, prompt, 16, set())
    index = next(i for i in range(min_reply, len(free_run)) if free_run[i] not in free_run[:i])
    assert stop_id not in free_run[: index + 1], "pick another seed: the free run already stops"
    token = free_run[index]
    with torch.no_grad():
        model.lm_head.weight[[token, stop_id]] = model.lm_head.weight[[stop_id, token]]
    return free_run[:index]


def steered_checkpoint(path: Path, tokenizer, messages: list[dict], template: str = "chatml"):
    """(checkpoint, reply ids) for a model whose greedy reply to `messages` stops after a few tokens."""
    eot_id = tokenizer.token_to_id(BUILTINS[template].eot)
    prompt = prompt_ids(messages, tokenizer, BUILTINS[template])
    reply: list[int] = []

    def steer(model):
        reply.extend(steer_to_stop(model, prompt, eot_id))

    return write_checkpoint(path, tokenizer, template, steer=steer), reply


# ---- a pretrained transformers model (model=hf) ---------------------------------------------------------

# chatml without {% generation %} tags: the trained spans are inferred.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_model_dir(directory: Path, vocab_size: int | None = None, **config) -> Path:
    """A transformers Llama directory: config.json + weights, tokenizer.json, tokenizer_config.json."""
    import transformers  # the [hf] extra: callers skip without it

    tokenizer = make_tokenizer(vocab_size=300)
    settings = dict(
        vocab_size=vocab_size or tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


# ---- the entry points in subprocesses -------------------------------------------------------------------

SMALL = [
    "data.num_train=240",
    "data.num_val=16",
    "data.batch_size=4",
    "eval.max_items=8",
    "eval.max_new_tokens=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, check: bool = True, script=None):
    """`python -m sft.<entry> args` (or a given script); returns the completed process."""
    command = [sys.executable, *(["-c", script] if script else ["-m", "sft.train"]), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def train(run_dir: Path, cache_dir: Path, *overrides: str, script: str | None = None, check: bool = True):
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]
    return run_cli(args, script=script, check=check)


def metric_rows(run_dir: Path, name: str) -> dict[int, float]:
    """{step: value} of one metric in metrics.csv."""
    with open(run_dir / "metrics.csv") as handle:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(handle) if row.get(name)}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ---- a tiny SFTModule fit in-process ----------------------------------------------------------------

MODEL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": True,
}
# Chunks of 3 trained positions: references that take the full logits test the chunking too.
OPTIM = {
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 1,
    "min_lr_ratio": 0.1,
    "grad_clip": 1e9,
    "loss_chunk_tokens": 3,
}


def make_examples(count: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Rows of different lengths with very different trained-token counts, so that a mean of
    per-micro-batch means would differ clearly from the global token mean."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        length = 6 + 9 * i
        ids = rng.integers(0, MODEL["vocab_size"], length)
        labels = np.full(length, IGNORE_INDEX)
        trained = slice(length - 2 - 4 * i, length)
        labels[trained] = ids[trained]
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": np.arange(length),
                "document_ids": np.zeros(length, dtype=np.int64),
            }
        )
    return rows


def fit_tiny(callbacks: list[L.Callback], validate: bool = False, **trainer_kwargs) -> L.Trainer:
    """SFTModule on the four example rows (batches of 2), with the given callbacks; the trainer after fit."""
    torch.manual_seed(0)
    settings = {"accelerator": "cpu", "logger": False, "enable_model_summary": False, **trainer_kwargs}
    trainer = L.Trainer(callbacks=callbacks, **settings)
    loader = DataLoader(make_examples(), batch_size=2, collate_fn=collate_rows)
    val_loader = loader if validate else None
    trainer.fit(SFTModule(MODEL, OPTIM), train_dataloaders=loader, val_dataloaders=val_loader)
    return trainer


# ---- models ----------------------------------------------------------------------------------------------


def tiny_decoder():
    """A 2-layer Llama of vocabulary 64 and context 40 with peaked logits (greedy runs vary by token)."""
    from sft.model.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


# ---- tables: Parquet, Arrow, a datasets cache (needs the [data] extra) -----------------------------------


def arrow_table(rows: list[dict]):
    """Rows under one schema unified over all of them (Table.from_pylist would take the first row's keys)."""
    import pyarrow as pa

    return pa.Table.from_struct_array(pa.array(rows))


def cache_hf_dataset(cache_root, repo_id: str, parquet: str, split: str = "train") -> None:
    """Put a Parquet file into a datasets cache exactly where `load_dataset(repo_id)` leaves a Hub download
    (`org___name/default/0.0.0/<commit>/name-split.arrow` + dataset_info.json), without any network."""
    import glob
    import os
    import shutil

    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    build_dir = os.path.join(str(cache_root), ".build")
    builder = Parquet(
        cache_dir=build_dir,
        dataset_name=name,
        config_name="default",
        hash="0" * 40,
        data_files={split: [parquet]},
    )
    builder.download_and_prepare()
    [built] = glob.glob(os.path.join(build_dir, name, "*", "0.0.0", "0" * 40))
    target = os.path.join(str(cache_root), f"{namespace}___{name}", "default", "0.0.0")
    os.makedirs(target)
    shutil.move(built, target)
    shutil.rmtree(build_dir)


# ---- the project's Llama, tiny (tests/model) ----


def tiny_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    )
    return LlamaConfig(**(values | overrides))


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # A larger init than the default 0.02 so attention is far from uniform and mask mistakes show.
    return LlamaForCausalLM(tiny_config(initializer_range=0.2, **overrides)).eval()


def random_ids(batch: int, seq_len: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def packed_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    """Two rows: three packed documents plus padding, and one document; about half the tokens trained."""
    input_ids = random_ids(2, 24, seed=seed)
    document_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 5 + [-1] * 3, [0] * 24])
    position_ids = torch.tensor([[*range(7), *range(9), *range(5), 0, 0, 0], [*range(24)]])
    labels = input_ids.clone()
    trained = torch.rand(2, 24, generator=torch.Generator().manual_seed(seed)) < 0.5
    labels[~trained | (document_ids < 0)] = IGNORE_INDEX
    labels[0, [0, 7, 16]] = IGNORE_INDEX  # a document's first token is never a target
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "document_ids": document_ids,
    }


def loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss_sum, count = loss_fn()
    (loss_sum / count).backward()
    return loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_relative_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        assert float((got[name] - want[name]).abs().max() / scale) < rtol, name


# ---- model=hf sections (tests/test_hf.py, tests/model/test_hf_training.py) ----


def hf_section(model_dir: Path, **values) -> dict:
    return {
        "name": "hf",
        "path": str(model_dir),
        "dtype": None,
        "attn_implementation": None,
        "lora": None,
        **values,
    }


LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


# ---- split conversations (prefix trees: tests/data/test_tree_batches.py, tests/test_module.py) -----------


def split_conversation_rows(
    rng: np.random.Generator, turns: int, vocab: int = MODEL["vocab_size"]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The per-turn rows of one conversation as a history-rewriting template gives them: row k is the
    shared system prompt, the history (earlier turns rendered shorter than they were trained, as Qwen3 drops
    their reasoning) and turn k, trained on its tail."""
    system = rng.integers(0, vocab, int(rng.integers(2, 6)))
    rows, history = [], system
    for _ in range(turns):
        prompt = np.concatenate([history, rng.integers(0, vocab, int(rng.integers(1, 4)))])
        answer = rng.integers(0, vocab, int(rng.integers(1, 6)))
        ids = np.concatenate([prompt, answer]).astype(np.int64)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[len(prompt) :] = answer
        rows.append((ids, labels))
        history = np.concatenate([prompt, answer[: max(1, len(answer) // 2)]])  # rewritten, shorter
    return rows


def trained_document(
    rng: np.random.Generator, vocab: int = MODEL["vocab_size"]
) -> tuple[np.ndarray, np.ndarray]:
    """One unsplit example: a prompt, then a trained answer."""
    ids = rng.integers(0, vocab, int(rng.integers(3, 10))).astype(np.int64)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[len(ids) // 2 :] = ids[len(ids) // 2 :]
    return ids, labels
