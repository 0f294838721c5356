"""Tokenizers: control tokens stay whole, tokenizer.json loads from a file or a model directory with exact
offsets, and the start-up checks refuse a tokenizer that would train the wrong tokens."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, processors

from sft.protocol.templates import BUILTINS
from sft.protocol.tokenizer import check_special_tokens, check_template_tokens, load_tokenizer, train_bpe
from sft.protocol.types import TemplateError
from tests.helpers import CHATML_SPECIALS, CORPUS, make_tokenizer

CHATML_TEXT = "<|im_start|>user\nHi  there\n\n<|im_end|>\n<|im_start|>assistant\nÜnï 🙂<|im_end|>\n"


def test_train_bpe_keeps_control_tokens_as_single_ids():
    tokenizer = train_bpe(CORPUS, vocab_size=300, special_tokens=CHATML_SPECIALS)
    for token in CHATML_SPECIALS:
        assert tokenizer.encode(token, add_special_tokens=False).ids == [tokenizer.token_to_id(token)]
    encoding = tokenizer.encode(CHATML_TEXT, add_special_tokens=False)
    assert encoding.tokens.count("<|im_start|>") == 2 and encoding.tokens.count("<|im_end|>") == 2
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == CHATML_TEXT  # byte-level: no loss


def test_load_tokenizer_from_a_file_or_a_model_directory(tmp_path, tokenizer):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    expected = tokenizer.encode(CHATML_TEXT, add_special_tokens=False).ids
    for path in (tmp_path / "tokenizer.json", tmp_path):
        assert load_tokenizer(path).encode(CHATML_TEXT, add_special_tokens=False).ids == expected
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        load_tokenizer(tmp_path / "missing")


def contiguous(offsets: list[tuple[int, int]], text: str) -> bool:
    """Byte-level tokens cover the text without gaps (a multi-byte character may be repeated)."""
    covered = 0
    for start, end in offsets:
        if start > covered or end <= start:
            return False
        covered = max(covered, end)
    return covered == len(text)


@pytest.mark.parametrize(
    "processor",
    [
        processors.ByteLevel(trim_offsets=True),
        processors.Sequence(
            [processors.ByteLevel(trim_offsets=True), processors.TemplateProcessing(single="$A")]
        ),
    ],
    ids=["bytelevel", "sequence"],
)
def test_gpt2_style_trimmed_offsets_are_untrimmed_on_load(tmp_path, processor):
    gpt2_style = make_tokenizer()
    gpt2_style.post_processor = processor
    gpt2_style.save(str(tmp_path / "tokenizer.json"))
    text = "Hello \n\n world  "
    trimmed = gpt2_style.encode(text, add_special_tokens=False)
    assert not contiguous(trimmed.offsets, text)  # the file, as written, trims whitespace out of offsets
    loaded = load_tokenizer(tmp_path / "tokenizer.json").encode(text, add_special_tokens=False)
    assert loaded.ids == trimmed.ids
    assert contiguous(loaded.offsets, text)


def test_check_special_tokens_names_the_missing_ones():
    tokenizer = make_tokenizer(special_tokens=["<|im_start|>"])
    with pytest.raises(TemplateError, match=r"'chatml'.*\['<\|im_end\|>'\].*tokenizer=bpe"):
        check_special_tokens(tokenizer, BUILTINS["chatml"].special_tokens, "chatml")


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_templates_pass_the_token_check(tokenizer, name):
    check_template_tokens(BUILTINS[name], tokenizer)


def test_token_check_refuses_a_tokenizer_without_a_control_token():
    with pytest.raises(TemplateError, match=r"<\|im_end\|>"):
        check_template_tokens(BUILTINS["chatml"], make_tokenizer(special_tokens=["<|im_start|>"]))


def test_token_check_refuses_a_token_across_a_span_boundary():
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(
        [AddedToken("assistant\nprobe")]
    )  # swallows the header's end and the content's start
    with pytest.raises(TemplateError) as raised:
        check_template_tokens(BUILTINS["chatml"], tokenizer)
    message = str(raised.value)
    assert "probe message 2" in message and "probe-assistant-1-5e1d" in message
    assert "'assistant\\nprobe'" in message and "across the boundary" in message


def test_token_check_refuses_an_end_of_turn_merged_with_what_follows():
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens([AddedToken("<|im_end|>\n", special=True)])  # longest match wins
    with pytest.raises(TemplateError, match="across the boundary"):
        check_template_tokens(BUILTINS["chatml"], tokenizer)


@pytest.mark.parametrize("reply", ["\nstarts with a newline", "  two spaces", "\n\n  both", "\tA tab"])
def test_replies_starting_with_whitespace_never_train_the_header_newline(reply):
    """A BPE trained on chats learns merges like "\\n\\n" and "\\n  "; if the header's newline could merge
    with a reply's first characters, the overlap rule would train a piece of the header."""
    import numpy as np

    from sft.protocol.labels import IGNORE_INDEX, labels_from_encoding
    from sft.protocol.templates import load_template
    from sft.protocol.tokenizer import train_bpe
    from sft.protocol.types import Message

    template = load_template({"name": "chatml"})
    chats = [
        template.render([Message("user", f"q{i}"), Message("assistant", f"{ws}answer {i}")]).text
        for i, ws in enumerate(["\n", "\n\n", "  ", "\n  ", "\t", ""] * 20)
    ]
    tokenizer = train_bpe(chats, vocab_size=300, special_tokens=template.special_tokens)
    rendered = template.render([Message("user", "hi"), Message("assistant", reply)])
    encoding = tokenizer.encode(rendered.text, add_special_tokens=False)
    ids, labels = labels_from_encoding(encoding, rendered.assistant_spans)
    trained = ids[labels != IGNORE_INDEX]
    assert tokenizer.decode(trained.tolist(), skip_special_tokens=False) == reply + "<|im_end|>"
    assert np.array_equal(trained, ids[-len(trained) - 1 : -1])  # one run: the reply and its end-of-turn
