"""The generations that eval.generate_every_n_steps logs: every mean score as a metric, and with W&B a table
of the items with their texts and every score (tool-call scores where the turn calls a tool)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import sft.generation_eval
import sft.wandb_generations
from sft.generation_callback import GenerationEvalCallback
from sft.generation_eval import generation_items
from sft.model.generate import generate, generate_batch
from sft.protocol.pipeline import ConversationEncoder
from sft.protocol.templates import BUILTINS
from sft.protocol.types import Conversation, Message, ProtocolConfig, ToolCall
from sft.scoring import SCORE_NAMES
from sft.wandb_generations import WandbExtras
from tests.helpers import make_tokenizer, tiny_decoder


class TableLogger:
    """Records what a W&B logger is asked to log."""

    def __init__(self):
        self.metrics, self.tables = [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_table(self, key, columns, data, step):
        self.tables.append((key, columns, data, step))


def test_the_wandb_table_has_every_score_and_tool_call_scores_for_calls(monkeypatch):
    template = BUILTINS["chatml"]  # calls in <tool_call> blocks: a bare JSON call is no call here
    tokenizer = make_tokenizer()
    call = ToolCall("get_weather", {"city": "Bern"})
    conversations = [
        Conversation([Message("user", "Hello"), Message("assistant", "Hi there.")]),
        Conversation([Message("user", "Weather in Bern?"), Message("assistant", "", tool_calls=(call,))]),
        Conversation([Message("user", "Weather, Bern?"), Message("assistant", "", tool_calls=(call,))]),
    ]
    encoder = ConversationEncoder(tokenizer, template, ProtocolConfig())
    items = generation_items([conversations], encoder, max_items=10)
    answers = {  # the first reference; the call with the wrong city; the call, but not in the format
        tuple(items[0].prompt_ids): items[0].reference,
        tuple(items[1].prompt_ids): items[1].reference.replace("Bern", "Basel"),
        tuple(items[2].prompt_ids): '{"name": "get_weather", "arguments": {"city": "Bern"}}',
    }
    monkeypatch.setattr(
        sft.generation_eval,
        "generate_batch",
        lambda model, prompts, *args, **kwargs: [
            tokenizer.encode(answers[tuple(prompt)] + template.eot, add_special_tokens=False).ids
            for prompt in prompts
        ],
    )
    config = SimpleNamespace(eval=SimpleNamespace(generate_every_n_steps=2), seed=0)
    callback = GenerationEvalCallback(config)
    callback._items = items
    logger = TableLogger()
    trainer = SimpleNamespace(
        global_step=2, is_global_zero=True, loggers=[logger], strategy=SimpleNamespace(barrier=print)
    )
    module = SimpleNamespace(model=tiny_decoder(), tokenizer=tokenizer, template=template)
    callback.on_train_batch_end(trainer, module)

    [(step, metrics)] = logger.metrics
    assert step == 2 and metrics["gen/exact_match"] == 1 / 3
    assert (metrics["gen/tool_call_parses"], metrics["gen/tool_call_arguments"]) == (0.5, 0.0)
    [(key, columns, rows, step)] = logger.tables
    assert (key, step) == ("gen/items", 2)
    assert columns == ["step", "where", "prompt", "reference", "generation", "stopped", *SCORE_NAMES]
    answer, wrong_city, bare = (dict(zip(columns, row, strict=True)) for row in rows)
    assert answer["generation"] == "Hi there." and answer["stopped"] is True
    assert [answer[name] for name in SCORE_NAMES] == [1.0, 1.0, 1.0, None, None, None]
    assert wrong_city["prompt"] == items[1].prompt and wrong_city["reference"] == items[1].reference
    assert [wrong_city[name] for name in SCORE_NAMES[3:]] == [1.0, 1.0, 0.0]
    assert [bare[name] for name in SCORE_NAMES[3:]] == [0.0, 0.0, 0.0]


def test_the_wandb_sample_table_is_generated_in_one_batch_as_each_prompt_alone(monkeypatch):
    labels = np.full(12, -100)
    labels[6:9] = 1  # the answer: prompt ids[:6], reference ids[6:9]
    examples = [(np.arange(start, start + 12), labels) for start in (1, 20, 40)]
    dataset = SimpleNamespace(index=examples, example_ids=np.arange(len(examples)))
    calls = []

    def counted(model, prompts, max_new_tokens, stop_ids, batch_size, *args, **kwargs):
        calls.append((len(prompts), batch_size))
        return generate_batch(model, prompts, max_new_tokens, stop_ids, batch_size, *args, **kwargs)

    monkeypatch.setattr(sft.wandb_generations, "generate_batch", counted)
    tokenizer = SimpleNamespace(
        token_to_id={"<eot>": 63}.get, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids))
    )
    model = tiny_decoder()
    module = SimpleNamespace(
        model=model, tokenizer=tokenizer, template=SimpleNamespace(stop_tokens=["<eot>"])
    )
    logger = TableLogger()
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        strategy=object(),
        datamodule=SimpleNamespace(val_dataset=dataset),
        global_step=5,
        logger=logger,
    )
    WandbExtras(count=3, max_new_tokens=6, batch_size=8).on_validation_epoch_end(trainer, module)

    assert calls == [(3, 8)]  # the three prompts decoded together, eval.batch_size at a time
    [(key, columns, rows, step)] = logger.tables
    assert (key, columns, step) == ("eval/generations", ["step", "prompt", "expected", "generated"], 5)
    alone = [generate(model, ids[:6].tolist(), 6, {63}) for ids, _ in examples]
    assert [row[3] for row in rows] == [" ".join(str(i) for i in ids if i != 63) for ids in alone]
    assert [row[1] for row in rows] == [" ".join(map(str, ids[:6])) for ids, _ in examples]
