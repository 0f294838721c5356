"""The protocol end to end: files → (input_ids, labels), batched, with an account of every line.

records → normalize_conversations → maybe_add_system_prompt → render_chat_prompt → encode_batch →
build_loss_labels → length policy. Rendering is per conversation (cheap string work); tokenization runs
in chunks through the Rust tokenizer (which uses every core); labels come from a few lookups at each
assistant span's ends (`labels_from_encoding`), never from a per-token Python loop.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Encoding, Tokenizer

from sft.protocol.labels import IGNORE_INDEX, labels_from_encoding
from sft.protocol.normalize import normalize_conversations
from sft.protocol.records import BLANK_LINE, record_to_conversation
from sft.protocol.sources import DataSource, read_records
from sft.protocol.system import maybe_add_system_prompt
from sft.protocol.templates import ChatTemplate, render_chat_prompt
from sft.protocol.types import (
    Conversation,
    Message,
    ProtocolConfig,
    ProtocolError,
    RenderedChat,
    TemplateError,
)

PROTOCOL_VERSION = 4  # bump when a change to this package changes the tokens or labels it produces
ENCODE_CHUNK = 2048  # texts per encode_batch call: large enough for both cores, small enough to stay fast
EXAMPLES_PER_REASON = 5  # locations remembered per skip/drop reason for the summary


class DataError(ValueError):
    """Bad input under `protocol.on_error=raise`: the message names file:line and the reason."""


@dataclass
class Accounting:
    """Every line read is kept, skipped (bad input or a blank line, with reason) or dropped (valid but
    unusable). `noted` counts remarks on lines that do not change their outcome (duplicate JSON keys)."""

    read: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but cut to max_seq_len
    truncated_tokens: int = 0  # tokens those kept examples lost
    longest: int = 0  # tokens of the longest example before any cut: the max_seq_len that keeps all whole
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)
    noted: Counter = field(default_factory=Counter)

    def note(self, kind: Counter, reason: str, where: str) -> None:
        kind[reason] += 1
        places = self.where.setdefault(reason, [])
        if len(places) < EXAMPLES_PER_REASON:
            places.append(where)

    def merge(self, other: Accounting) -> None:
        self.read += other.read
        self.kept += other.kept
        self.truncated += other.truncated
        self.truncated_tokens += other.truncated_tokens
        self.longest = max(self.longest, other.longest)
        self.skipped.update(other.skipped)
        self.dropped.update(other.dropped)
        self.noted.update(other.noted)
        for reason, places in other.where.items():
            mine = self.where.setdefault(reason, [])
            mine.extend(places[: EXAMPLES_PER_REASON - len(mine)])

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "truncated": self.truncated,
            "truncated_tokens": self.truncated_tokens,
            "longest": self.longest,
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
            "noted": dict(self.noted),
            "where": self.where,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Accounting:
        return cls(
            read=data["read"],
            kept=data["kept"],
            truncated=data["truncated"],
            truncated_tokens=data.get("truncated_tokens", 0),
            longest=data.get("longest", 0),
            skipped=Counter(data["skipped"]),
            dropped=Counter(data["dropped"]),
            where={k: list(v) for k, v in data["where"].items()},
            noted=Counter(data.get("noted", {})),
        )

    def relative_to(self, source: str) -> Accounting:
        """A copy whose places drop the file name `source` (":4", " record 3"): what a store keeps, since
        the store is shared by every file with the same bytes, whatever it is called."""
        return self._replace_places(
            lambda place: place[len(source) :] if _is_relative(place.removeprefix(source)) else place
        )

    def located_in(self, source: str) -> Accounting:
        """The inverse of `relative_to`: places under the name this run gave the file. A place in one of
        an entry's several files (a Parquet folder, an hf:// split) keeps its file's path."""
        return self._replace_places(lambda place: source + place if _is_relative(place) else place)

    def _replace_places(self, change) -> Accounting:
        copy = Accounting.from_dict(self.to_dict())
        copy.where = {reason: [change(place) for place in places] for reason, places in self.where.items()}
        return copy

    def summary(self) -> str:
        """One line per outcome; the counts add up to `read`."""
        lines = [
            f"read {self.read} = kept {self.kept} + skipped {sum(self.skipped.values())} "
            f"+ dropped {sum(self.dropped.values())}"
        ]
        if self.truncated:
            lines.append(
                f"  truncated {self.truncated} kept to protocol.max_seq_len: {self.truncated_tokens:,} "
                f"tokens cut (the longest example has {self.longest:,}; protocol.max_seq_len={self.longest} "
                "keeps every example whole)"
            )
        for title, counter in (("skipped", self.skipped), ("dropped", self.dropped), ("noted", self.noted)):
            for reason, count in sorted(counter.items()):
                lines.append(f"  {title} {count} {reason}: {', '.join(self.where.get(reason, []))}")
        return "\n".join(lines)


def _is_relative(place: str) -> bool:
    return place.startswith((":", " record"))


@dataclass(slots=True)
class EncodedExample:
    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64, IGNORE_INDEX where not trained
    where: str  # file:line


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


def special_token_pattern(tokenizer: Tokenizer, control_tokens: Iterable[str] = ()) -> re.Pattern | None:
    """A regex matching the literal text of every special added token and of the template's control
    tokens: `encode` would turn any of them into a control id if a user typed it."""
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    specials.update(control_tokens)
    if not specials:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))


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
        self.requires_alternation = getattr(template, "requires_alternation", False)

    # ---- per conversation (pure Python) ------------------------------------------------------------------
    def prepare(self, conversation: Conversation, index: int) -> tuple[Conversation, RenderedChat]:
        """normalize → system prompt → mask strategy → render; raises ProtocolError on bad input."""
        conversation = normalize_conversations(
            conversation, self.config, requires_alternation=self.requires_alternation
        )
        if self.special_pattern is not None:
            for number, message in enumerate(conversation.messages, start=1):
                found = self.special_pattern.search(message.content)
                if found:
                    raise ProtocolError(
                        "special_token_in_content",
                        f"message {number} ({message.role}) contains the control token {found.group()!r}, "
                        "which would be tokenized as the real control token; set "
                        "protocol.special_in_content=allow to accept it",
                    )
        conversation = maybe_add_system_prompt(conversation, self.config, index)
        conversation.messages = apply_mask_strategy(conversation.messages, self.config.mask)
        return conversation, self._render(conversation.messages, conversation.tools)

    def _render(self, messages: list[Message], tools: list | None) -> RenderedChat:
        rendered = render_chat_prompt(messages, self.template, tools=tools)
        if self.config.mask == "all_tokens":  # the ablation baseline: every token of the text is a target
            return RenderedChat(rendered.text, [(0, len(rendered.text))])
        return rendered

    def _apply_length_policy(
        self, conversation: Conversation, rendered: RenderedChat, encoding: Encoding, accounting: Accounting
    ) -> EncodedExample | None:
        """The example as encoded, cut or shortened to max_seq_len, or None (counted) when it is dropped."""
        ids, labels = labels_from_encoding(encoding, rendered.assistant_spans)
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
        if not np.any(labels != IGNORE_INDEX):  # every trained token lay beyond max_seq_len, or never was
            reason = "truncated_to_nothing" if truncated else "no_trained_tokens"
            accounting.note(accounting.dropped, reason, conversation.where)
            return None
        accounting.kept += 1
        accounting.truncated += truncated
        accounting.truncated_tokens += full_length - len(ids)
        return EncodedExample(ids, labels, conversation.where)

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
        attempts: dict[int, tuple[RenderedChat, Encoding]] = {}

        def fits(dropped: int) -> bool:
            if dropped not in attempts:
                kept = messages[:head] + messages[exchange_starts[dropped - 1] :]
                rendered = self._render(kept, conversation.tools)
                attempts[dropped] = (rendered, self.tokenizer.encode(rendered.text, add_special_tokens=False))
            return len(attempts[dropped][1]) <= self.config.max_seq_len

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
        return labels_from_encoding(encoding, rendered.assistant_spans)

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
                submitted = (chunk, tokenizing.submit(self._encode_texts, chunk))
                if in_flight is not None:
                    yield from self._examples(*in_flight, accounting)
                in_flight = submitted
            if in_flight is not None:
                yield from self._examples(*in_flight, accounting)

    def _encode_texts(self, chunk: list[tuple[Conversation, RenderedChat]]) -> list[Encoding]:
        return self.tokenizer.encode_batch([rendered.text for _, rendered in chunk], add_special_tokens=False)

    def _examples(
        self, chunk: list[tuple[Conversation, RenderedChat]], encodings: Future, accounting: Accounting
    ) -> Iterator[EncodedExample]:
        for (conversation, rendered), encoding in zip(chunk, encodings.result(), strict=True):
            example = self._apply_length_policy(conversation, rendered, encoding, accounting)
            if example is not None:
                yield example

    def _prepared_chunks(
        self, conversations: Iterable[Conversation | ProtocolError], accounting: Accounting
    ) -> Iterator[list[tuple[Conversation, RenderedChat]]]:
        """Rendered conversations in chunks of ENCODE_CHUNK; bad input raised or skipped and counted."""
        chunk: list[tuple[Conversation, RenderedChat]] = []
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
            if len(chunk) >= ENCODE_CHUNK:
                yield chunk
                chunk = []
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
