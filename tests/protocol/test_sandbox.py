"""The template sandbox: transformers' guards, and bounded time and size, refused with the template's name."""

from __future__ import annotations

import time

import pytest

from sft.protocol.templates import JinjaTemplate, check_template, load_template
from sft.protocol.types import Message, TemplateError

CONVERSATION = [Message("user", "Hi"), Message("assistant", "Hello!")]


def refusal(source: str, **limits) -> str:
    template = JinjaTemplate(source, eot="<e>", origin="template.path=evil.jinja", **limits)
    with pytest.raises(TemplateError) as error:
        template.render_text(CONVERSATION)
    return str(error.value)


def test_nested_loops_stop_at_the_time_limit_naming_the_template():
    started = time.monotonic()
    error = refusal(
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", time_limit_s=0.5
    )
    assert time.monotonic() - started < 5
    assert "template.path=evil.jinja" in error and "time limit" in error


def test_huge_values_are_refused_before_they_are_built():
    started = time.monotonic()
    assert "1,000,000,000" in refusal("{% for i in range(10**9) %}{% endfor %}")
    assert "10,000,000,000" in refusal('{% set s = "a" * 10**10 %}{{ s }}')
    assert "10,000,000,000" in refusal('{% set s = ["a"] * 10**10 %}')
    assert "exponent" in refusal("{{ 10 ** 100000 }}")
    assert "argument" in refusal('{{ "a".center(10**10) }}')
    assert "argument" in refusal('{{ "a" | center(10**10) }}')
    assert "format string" in refusal('{{ "{:>10000000000}".format(1) }}')
    assert time.monotonic() - started < 5


def test_output_and_built_strings_are_bounded():
    assert "output passed 100,000" in refusal(
        "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}", output_limit=100_000
    )
    doubling = (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}"
    )
    assert "built a value" in refusal(doubling, output_limit=100_000)
    assert "RecursionError" in refusal("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")


@pytest.mark.parametrize(
    ("statement", "name"),
    [
        ("{% include 'x.jinja' %}", "include"),
        ("{% import 'x' as x %}", "import"),
        ("{% extends 'x' %}", "extends"),
    ],
)
def test_statements_that_read_files_are_refused_at_load(tmp_path, statement, name):
    path = tmp_path / "evil.jinja"
    path.write_text(statement)
    with pytest.raises(TemplateError, match=rf"template.path={path} uses {{% {name} %}}"):
        load_template({"name": "jinja", "path": str(path), "eot": "<e>"})


def test_transformers_guards_dict_and_namespace():
    assert "may not start with '_'" in refusal("{% set ns = namespace(_x=1) %}")
    assert "sandbox" in refusal("{{ dict.__class__.__mro__ }}")
    assert "sandbox" in refusal("{{ ''.__class__.__mro__ }}")
    template = JinjaTemplate("{{ dict(a=1) | tojson }}{{ dict.fromkeys(['b']) | tojson }}", eot="<e>")
    assert template.render_text([]) == '{"a": 1}{"b": null}'


def test_a_hanging_template_is_refused_by_the_start_up_probe():
    hanging = (
        "{% for m in messages %}{{ m.content }}<e>{% endfor %}"
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="time limit"):
        check_template(JinjaTemplate(hanging, eot="<e>", time_limit_s=0.2))


def test_strftime_now_prints_the_configured_date():
    source = "{{ strftime_now('%d %b %Y') }}"
    assert JinjaTemplate(source, eot="<e>").render_text([]) == "01 Jan 2026"
    dated = load_template({"name": "jinja", "source": source, "eot": "<e>", "date": "2025-07-26"})
    assert dated.render_text([]) == "26 Jul 2025"
