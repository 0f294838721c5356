"""The protocol end to end: files → (input_ids, labels), batched, with an account of every line.

records → normalize_conversations → maybe_add_system_prompt → render_chat_prompt → encode_batch →
build_loss_labels → length policy. Rendering is per conversation (cheap string work); tokenization runs
in chunks through the Rust tokenizer (which uses every core); labels come from each assistant span's ends
placed among the tokens (`encoding.RowEncoder`), never from a per-token Python loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from sft.protocol.accounting import Accounting
from sft.protocol.control_tokens import (
    ControlTokenScan,
    control_token_texts,
    data_strings,
    special_token_pattern,
)
from sft.protocol.encoding import RowEncoder
from sft.protocol.labels import IGNORE_INDEX
from sft.protocol.normalize import normalize_conversations
from sft.protocol.records import BLANK_LINE, record_to_conversation
from sft.protocol.sources import DataSource, read_records
from sft.protocol.system import maybe_add_system_prompt
from sft.protocol.templates import ChatTemplate
from sft.protocol.types import (
    Conversation,
    Message,
    ProtocolConfig,
    ProtocolError,
    RenderedChat,
    TemplateError,
)

PROTOCOL_VERSION = 7  # bump when a change to this package changes the tokens or labels it produces
ENCODE_CHUNK = 2048  # texts per encode_batch call: large enough for both cores, small enough to stay fast
# The first chunk is this small, so the tokenizer thread starts early; each next one doubles to ENCODE_CHUNK.
FIRST_CHUNK = 128


class DataError(ValueError):
    """Bad input under `protocol.on_error=raise`: the message names file:line and the reason."""


@dataclass(slots=True)
class EncodedExample:
    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, IGNORE_INDEX where not trained
    where: str  # file:line
    split: tuple[int, int] | None = None  # (turn, of) for a row of a conversation split into per-turn rows
    record: int = 0  # its conversation's index in its entry's input (Conversation.index)


def apply_mask_strategy(messages: list[Message], mask: str) -> list[Message]:
    """`last_turn` trains only the final assistant message; `all_assistant` keeps each message's own flag
    (`all_tokens` trains the whole text, see ConversationEncoder.prepare)."""
    if mask in ("all_assistant", "all_tokens"):
        return messages
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    return [
        dataclasses.replace(m, train=False) if m.role == "assistant" and i != last else m
        for i, m in enumerate(messages)
    ]


def only_turn(messages: list[Message], k: int) -> list[Message]:
    """messages[:k+1] with only turn k trained: the conversation of turn k's own row."""
    return [m if i == k else dataclasses.replace(m, train=False) for i, m in enumerate(messages[: k + 1])]


@dataclass(slots=True)
class Row:
    """One example of a conversation: what it renders (for truncation=turns) and the rendering."""

    conversation: Conversation
    rendered: RenderedChat


class ConversationEncoder:
    """Turns conversations into examples under one tokenizer, template and protocol config."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, config: ProtocolConfig):
        self.tokenizer = tokenizer
        self.template = template
        self.config = config
        self.special_pattern = (
            special_token_pattern(tokenizer, template.special_tokens)
            if config.special_in_content == "reject"
            else None
        )
        self.control_scan = (
            ControlTokenScan(control_token_texts(tokenizer, template.special_tokens))
            if self.special_pattern is not None
            else None
        )
        self.requires_alternation = getattr(template, "requires_alternation", False)
        self.row_encoder = RowEncoder(tokenizer)
        prompts = [config.system_prompt] if isinstance(config.system_prompt, str) else config.system_prompt
        for prompt in prompts or []:
            found = self.special_pattern.search(prompt) if self.special_pattern else None
            if found:
                raise ValueError(
                    f"protocol.system_prompt contains the control token {found.group()!r}, which would be "
                    "tokenized as the real control token; remove it (or protocol.special_in_content=allow)"
                )

    # ---- per conversation (pure Python) ------------------------------------------------------------------
    def prepare(self, conversation: Conversation, index: int) -> tuple[Conversation, list[Row]]:
        """normalize → system prompt → mask strategy → render; raises ProtocolError on bad input."""
        conversation = normalize_conversations(
            conversation, self.config, requires_alternation=self.requires_alternation
        )
        if self.control_scan is not None and self.control_scan.maybe_found(conversation):
            for where, text in data_strings(conversation):
                found = self.special_pattern.search(text)
                if found:
                    raise ProtocolError(
                        "special_token_in_content",
                        f"{where} contains the control token {found.group()!r}, which would be tokenized as "
                        "the real control token; set protocol.special_in_content=allow to accept it",
                    )
        conversation.index = index  # a new Conversation (normalize_conversations): the input is not touched
        conversation = maybe_add_system_prompt(conversation, self.config, index)
        conversation.messages = apply_mask_strategy(conversation.messages, self.config.mask)
        return conversation, self.rows(conversation)

    def rows(self, conversation: Conversation, turns: str | None = None) -> list[Row]:
        """The conversation's rows under protocol.turns (or `turns`): see ChatTemplate.render_rows."""
        messages, tools, variables = conversation.messages, conversation.tools, conversation.variables
        if self.config.mask == "all_tokens":  # the ablation baseline: every token of the text is a target
            text = self.template.render_text(messages, tools, False, variables)
            return [Row(conversation, RenderedChat(text, [(0, len(text))]))]
        rendered = self.template.render_rows(messages, tools, variables, turns or self.config.turns)
        if len(rendered) == 1:
            return [Row(conversation, rendered[0])]
        trained = [k for k, m in enumerate(messages) if m.role == "assistant" and m.train]
        return [
            Row(dataclasses.replace(conversation, messages=only_turn(messages, k)), row)
            for k, row in zip(trained, rendered, strict=True)
        ]

    def _render(
        self, messages: list[Message], tools: list | None, variables: dict | None = None
    ) -> RenderedChat | None:
        """One row for `messages` (truncation=turns re-renders a row after dropping its oldest exchanges):
        a split row's conversation trains only its last turn, so protocol.turns gives it exactly one row,
        its turn's inference row (P_k + T where the template renders that turn's history otherwise). None
        when the shortened conversation no longer trains in one row (it then counts as not fitting)."""
        if self.config.mask == "all_tokens":
            text = self.template.render_text(messages, tools, False, variables)
            return RenderedChat(text, [(0, len(text))])
        rows = self.template.render_rows(messages, tools, variables, self.config.turns)
        return rows[0] if len(rows) == 1 else None

    def _exact_example(
        self, row: Row, encoding: Encoding, exact: bool, accounting: Accounting
    ) -> EncodedExample | None:
        if not exact:
            accounting.note(accounting.dropped, "tokens_cross_turn_boundary", row.conversation.where)
            return None
        return self._apply_length_policy(row.conversation, row.rendered, encoding, accounting)

    def _apply_length_policy(
        self, conversation: Conversation, rendered: RenderedChat, encoding: Encoding, accounting: Accounting
    ) -> EncodedExample | None:
        """The example as encoded, cut or shortened to max_seq_len, or None (counted) when it is dropped."""
        ids, labels = self.row_encoder.labels(rendered, encoding)
        full_length = len(ids)
        accounting.longest = max(accounting.longest, full_length)
        truncated = full_length > self.config.max_seq_len
        if truncated:
            if self.config.truncation == "drop":
                accounting.note(accounting.dropped, "too_long", conversation.where)
                return None
            if self.config.truncation == "turns":
                shortened = self._drop_oldest_turns(conversation)
                if shortened is None:
                    accounting.note(accounting.dropped, "too_long", conversation.where)
                    return None
                ids, labels = shortened
            else:
                ids, labels = ids[: self.config.max_seq_len], labels[: self.config.max_seq_len]
        if labels.max() == IGNORE_INDEX:  # ids are >= 0: every trained token lay beyond max_seq_len, or none
            reason = "truncated_to_nothing" if truncated else "no_trained_tokens"
            accounting.note(accounting.dropped, reason, conversation.where)
            return None
        accounting.kept += 1
        accounting.truncated += truncated
        accounting.truncated_tokens += full_length - len(ids)
        return EncodedExample(ids, labels, conversation.where, record=conversation.index)

    def _drop_oldest_turns(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray] | None:
        """The example without its oldest whole exchanges (an exchange: a user turn through the turns before
        the next user turn), keeping any system prompt: the fewest dropped that fit max_seq_len. None when
        no count fits while a trained assistant turn remains.

        A binary search over the count, so a conversation of n exchanges costs O(log n) renders and
        encodings, not n. Each candidate is rendered and encoded whole, so a template that renders the
        remaining turns differently (a moved system prompt, a date) is measured as it really renders. The
        count found is exact at its boundary: it fits and one fewer was rendered and does not (or is the
        whole conversation). It is the smallest that fits if dropping more exchanges never lengthens the
        rendering (monotone), which holds for templates that render each turn on its own.
        """
        messages = conversation.messages
        head = 1 if messages and messages[0].role == "system" else 0
        exchange_starts = [i for i in range(head + 1, len(messages)) if messages[i].role == "user"]
        trained = [i for i, m in enumerate(messages) if m.role == "assistant" and m.train]
        # Dropping k exchanges keeps messages[exchange_starts[k - 1]:]; a trained turn must remain.
        most = sum(start <= trained[-1] for start in exchange_starts) if trained else 0
        attempts: dict[int, tuple[RenderedChat, Encoding] | None] = {}

        def fits(dropped: int) -> bool:
            if dropped not in attempts:
                kept = messages[:head] + messages[exchange_starts[dropped - 1] :]
                rendered = self._render(kept, conversation.tools, conversation.variables)
                attempts[dropped] = rendered and (rendered, self.row_encoder.encode_batch([rendered.text])[0])
            attempt = attempts[dropped]
            return attempt is not None and len(attempt[1]) <= self.config.max_seq_len

        if most == 0 or not fits(most):
            return None
        low, high = 1, most  # invariant: fits(high); low - 1 is 0 or was seen not to fit
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        # The boundary: high fits, and high - 1 was rendered and did not (the search only raises `low`
        # past a count that failed), or is 0, the whole conversation, which did not fit either.
        rendered, encoding = attempts[high]
        return self.row_encoder.labels(rendered, encoding)

    # ---- batched -----------------------------------------------------------------------------------------
    def encode_conversations(
        self, conversations: Iterable[Conversation | ProtocolError], accounting: Accounting
    ) -> Iterator[EncodedExample]:
        """The batched hot path. Items are conversations, or errors already found while reading; examples
        come out in input order.

        Pipelined: one thread tokenizes chunk k (the Rust tokenizer releases the GIL and uses every core)
        while this thread reads, validates and renders chunk k + 1 and builds the labels of chunk k - 1.
        """
        with ThreadPoolExecutor(max_workers=1) as tokenizing:
            in_flight = None
            for chunk in self._prepared_chunks(conversations, accounting):
                submitted = (chunk, tokenizing.submit(self.encode_rows, chunk))
                if in_flight is not None:
                    yield from self._examples(*in_flight, accounting)
                in_flight = submitted
            if in_flight is not None:
                yield from self._examples(*in_flight, accounting)

    def encode_rows(self, chunk: list[tuple[Conversation, list[Row]]]) -> list[Encoding]:
        """Every row's text, then the prefixes at each row's boundaries, in one batch."""
        rows = [row.rendered for _, item_rows in chunk for row in item_rows]
        prefixes = [rendered.text[:end] for rendered in rows for end in rendered.boundaries]
        return self.row_encoder.encode_batch([r.text for r in rows] + prefixes)

    def _examples(
        self, chunk: list[tuple[Conversation, list[Row]]], encodings: Future, accounting: Accounting
    ) -> Iterator[EncodedExample]:
        encoded = iter(encodings.result())
        row_encodings = [[next(encoded) for _ in rows] for _, rows in chunk]
        for (conversation, rows), encodings_of_rows in zip(chunk, row_encodings, strict=True):
            prefixes = [[next(encoded) for _ in row.rendered.boundaries] for row in rows]
            exact = list(map(_encodes_as_prefixes, encodings_of_rows, prefixes))
            if not all(exact) and len(rows) == 1 and len(rows[0].rendered.assistant_spans) > 1:
                rows = self._split_at_token_boundaries(conversation)
                encodings = iter(self.encode_rows([(conversation, rows)]))
                encodings_of_rows = [next(encodings) for _ in rows]
                prefixes = [[next(encodings) for _ in row.rendered.boundaries] for row in rows]
                exact = list(map(_encodes_as_prefixes, encodings_of_rows, prefixes))
            yield from self._conversation_examples(rows, encodings_of_rows, exact, accounting)

    def _split_at_token_boundaries(self, conversation: Conversation) -> list[Row]:
        """The tokenizer merges across where a turn or its generation prompt ends, so inside one row the
        turn's tokens are not those of inference: split (turns=auto) or refuse (turns=whole)."""
        if self.config.turns == "whole":
            raise TemplateError(
                f"{conversation.where}: the tokenizer merges text across the end of a generation prompt or a "
                "turn, so one row would not train the tokens of inference; protocol.turns=auto splits such "
                "conversations into one row per turn"
            )
        return self.rows(conversation, "per_turn")

    def _conversation_examples(
        self, rows: list[Row], encodings: list[Encoding], exact: list[bool], accounting: Accounting
    ) -> Iterator[EncodedExample]:
        """The examples of one conversation's rows; it is kept when one of them is, else dropped with the
        reason of its first row. A row whose tokens are not inference's (`exact` False: the tokenizer
        merges across its prompt's end) is dropped as `tokens_cross_turn_boundary`."""
        if len(rows) == 1:
            example = self._exact_example(rows[0], encodings[0], exact[0], accounting)
            accounting.rows += example is not None
            yield from [example] if example is not None else []
            return
        outcomes = [Accounting() for _ in rows]
        examples = [
            self._exact_example(row, encoding, row_exact, outcome)
            for row, encoding, row_exact, outcome in zip(rows, encodings, exact, outcomes, strict=True)
        ]
        kept = [example for example in examples if example is not None]
        for turn, (example, outcome, row) in enumerate(zip(examples, outcomes, rows, strict=True), start=1):
            if example is None and kept:  # the conversation stays, without this turn: say so
                reason = next(iter(outcome.dropped))
                where = f"{row.conversation.where} (turn {turn} of {len(rows)})"
                accounting.note(accounting.noted, f"turn_{reason}", where)
        for turn, example in enumerate(kept, start=1):
            example.split = (turn, len(kept))
        accounting.longest = max(accounting.longest, *(outcome.longest for outcome in outcomes))
        if kept:
            accounting.kept += 1
            accounting.truncated += any(outcome.truncated for outcome in outcomes)
            accounting.truncated_tokens += sum(outcome.truncated_tokens for outcome in outcomes)
            accounting.rows += len(kept)
            accounting.split += 1
            accounting.split_rows += len(kept)
        else:
            reason = next(iter(outcomes[0].dropped))
            accounting.note(accounting.dropped, reason, rows[0].conversation.where)
        yield from kept

    def _prepared_chunks(
        self, conversations: Iterable[Conversation | ProtocolError], accounting: Accounting
    ) -> Iterator[list[tuple[Conversation, list[Row]]]]:
        """Rendered conversations in chunks of FIRST_CHUNK doubling to ENCODE_CHUNK, the last one halving
        back; bad input raised or skipped and counted."""
        chunk: list[tuple[Conversation, list[Row]]] = []
        chunk_size = FIRST_CHUNK
        for index, item in enumerate(conversations):
            accounting.read += 1
            where = getattr(item, "where", "?")
            if isinstance(item, ProtocolError) and item.reason == BLANK_LINE:
                accounting.note(accounting.skipped, BLANK_LINE, where)  # not an error, whatever on_error says
                continue
            try:
                if isinstance(item, ProtocolError):
                    raise item
                if item.duplicate_keys:  # kept (JSON's last value wins), but never silently
                    accounting.note(accounting.noted, "duplicate_keys", where)
                chunk.append(self.prepare(item, index))
            except ProtocolError as error:
                if self.config.on_error == "raise":
                    raise DataError(
                        f"{where}: {error.reason}: {error} "
                        "(set protocol.on_error=skip to skip and count such lines)"
                    ) from error
                accounting.note(accounting.skipped, error.reason, where)
            except TemplateError as error:  # the template, not the line, is at fault: never skipped
                raise TemplateError(f"{where}: {error}") from error
            if len(chunk) >= chunk_size:
                yield chunk
                chunk, chunk_size = [], min(2 * chunk_size, ENCODE_CHUNK)
        # What is left at the end in halves: once the tokenizer is done, little is left to label (a last
        # chunk that happens to fill is sent whole, as before).
        while len(chunk) > FIRST_CHUNK:
            yield chunk[: len(chunk) // 2]
            chunk = chunk[len(chunk) // 2 :]
        if chunk:
            yield chunk

    def encode_file(
        self,
        path: str | DataSource,
        fmt: str,
        accounting: Accounting,
        columns: Mapping[str, str] | None = None,
    ) -> Iterator[EncodedExample]:
        yield from self.encode_conversations(read_conversations(path, fmt, columns), accounting)


def _encodes_as_prefixes(encoding: Encoding, prefixes: list[Encoding]) -> bool:
    """Each prefix text, encoded alone (as inference encodes a prompt), gives the row's first tokens."""
    if not prefixes:  # most rows: then not even the ids are read (a list built from the Rust side)
        return True
    ids = encoding.ids
    return all(ids[: len(prefix.ids)] == prefix.ids for prefix in prefixes)


def read_conversations(
    path: str | DataSource, fmt: str = "auto", columns: Mapping[str, str] | None = None
) -> Iterator[Conversation | ProtocolError]:
    """Each record of a data entry (sources.py) as a Conversation, or as the ProtocolError (with `.where`)
    that it raised; `columns` renames fields first."""
    for raw in read_records(path, columns):
        try:
            if raw.error is not None:
                raise raw.error
            yield record_to_conversation(raw, fmt)
        except ProtocolError as error:
            error.where = raw.where
            yield error
