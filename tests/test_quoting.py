"""Errors that come from Hydra's quoting rules show the quoted example."""

from __future__ import annotations

import pytest

from sft.cli.entry import parse_overrides
from sft.config import ConfigError
from sft.protocol.templates import load_template
from sft.protocol.types import TemplateError

QUOTED_EOT = "\"template.eot='<|im_end|>'\""


def test_a_jinja_template_without_its_end_of_turn_marker_shows_how_to_give_one():
    with pytest.raises(TemplateError, match="set template.eot") as error:
        load_template({"name": "jinja", "source": "{{ messages[0]['content'] }}"})
    assert QUOTED_EOT in str(error.value)


def test_an_override_hydra_cannot_parse_shows_the_quoted_form():
    with pytest.raises(ConfigError, match="cannot parse the command line") as error:
        parse_overrides(["trainer.max_steps=3", "template.eot=<|im_end|>"])
    assert QUOTED_EOT in str(error.value)
