"""The template engine: handlebars-like syntax, escaping, defaults, strictness and syntax errors."""

from __future__ import annotations

from typing import Any

import pytest

from services.sender.rendering import RenderError, TemplateSyntaxError, parse, parse_data


def render(source: str, data: dict[str, Any], *, html: bool = False) -> str:
    return parse(source).render(data, escape_html=html)


@pytest.mark.parametrize(
    "source,data,expected",
    [
        ("Hello {{name}}!", {"name": "Ada"}, "Hello Ada!"),
        ("{{user.address.city}}", {"user": {"address": {"city": "Oslo"}}}, "Oslo"),
        ("{{ name }}", {"name": "spaces"}, "spaces"),
        ("{{n}} {{f}} {{t}} {{z}}", {"n": 3, "f": 1.5, "t": True, "z": None}, "3 1.5 true "),
        ("{{list}}", {"list": [1, "a"]}, '[1,"a"]'),
        ('{{default name "friend"}}', {}, "friend"),
        ('{{default name "friend"}}', {"name": ""}, "friend"),
        ('{{default name "friend"}}', {"name": None}, "friend"),
        ('{{default name "friend"}}', {"name": "Bo"}, "Bo"),
        ('{{default a.b "say \\"hi\\""}}', {}, 'say "hi"'),
        ("{{#if vip}}VIP{{else}}regular{{/if}}", {"vip": True}, "VIP"),
        ("{{#if vip}}VIP{{else}}regular{{/if}}", {"vip": False}, "regular"),
        ("{{#if vip}}VIP{{else}}regular{{/if}}", {}, "regular"),
        ("{{#if n}}yes{{else}}no{{/if}}", {"n": 0}, "no"),
        ("{{#if s}}yes{{else}}no{{/if}}", {"s": ""}, "no"),
        ("{{#if l}}yes{{else}}no{{/if}}", {"l": []}, "no"),
        ("{{#if o}}yes{{else}}no{{/if}}", {"o": {}}, "yes"),
        ("{{#unless paid}}pay now{{/unless}}", {"paid": False}, "pay now"),
        ("{{#unless paid}}pay now{{/unless}}", {"paid": True}, ""),
        ("{{#each items}}[{{this}}]{{/each}}", {"items": ["a", "b"]}, "[a][b]"),
        (
            "{{#each items}}{{@index}}:{{name}}{{#if @last}}.{{else}}, {{/if}}{{/each}}",
            {"items": [{"name": "x"}, {"name": "y"}]},
            "0:x, 1:y.",
        ),
        ("{{#each items}}{{name}} of {{shop}};{{/each}}", {"shop": "S", "items": [{"name": "a"}]}, "a of S;"),
        ("{{#each m}}{{@key}}={{this}} {{/each}}", {"m": {"a": 1, "b": 2}}, "a=1 b=2 "),
        ("{{#each items}}x{{else}}none{{/each}}", {"items": []}, "none"),
        ("{{#each items}}x{{else}}none{{/each}}", {}, "none"),
        ("{{#each rows}}{{#each this}}{{this}}{{/each}};{{/each}}", {"rows": [[1, 2], [3]]}, "12;3;"),
        ("a{{! a comment }}b{{!-- {{not a tag}} --}}c", {}, "abc"),
        ("{{this.name}}", {"name": "root"}, "root"),
        ("no tags at all } { }}", {}, "no tags at all } { }}"),
    ],
)
def test_renders(source: str, data: dict[str, Any], expected: str) -> None:
    assert render(source, data) == expected


def test_html_part_is_escaped_unless_triple_stashed() -> None:
    data = {"x": "<script>alert('x')</script> & \"q\" `b` a=b"}
    assert render("{{x}}", data, html=True) == (
        "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot; &#x60;b&#x60; a&#x3D;b"
    )
    assert render("{{{x}}}", data, html=True) == data["x"]
    assert render("{{x}}", data, html=False) == data["x"]  # text and subject are never escaped
    assert render('{{{default y "<b>"}}}|{{default y "<b>"}}', {}, html=True) == "<b>|&lt;b&gt;"


def test_missing_value_is_a_rendering_failure() -> None:
    with pytest.raises(RenderError, match=r"Attribute 'user\.name' is not present"):
        render("Hi {{user.name}}", {"user": {}})
    with pytest.raises(RenderError, match="not a list"):
        render("{{#each n}}x{{/each}}", {"n": 5})


@pytest.mark.parametrize(
    "source,message",  # regular expressions
    [
        ("{{#if x}}open", "never closed"),
        ("{{#if x}}a{{/each}}", "does not close"),
        ("{{/if}}", "closes no block"),
        ("{{else}}", "outside"),
        ("{{#if x}}a{{else}}b{{else}}c{{/if}}", "outside"),
        ("{{#with x}}{{/with}}", "Unknown block helper"),
        ("{{}}", "Empty tag"),
        ("{{a b}}", "Unknown helper"),
        ("{{default a}}", "default"),
        ("{{default a 'single'}}", "default"),
        ("{{a..b}}", "not a valid variable name"),
        ("{{1abc}}", "not a valid variable name"),
        ("Hello {{name", "Unclosed tag"),
        ("line\n  {{#bad x}}", "line 2, column 3"),
    ],
)
def test_syntax_errors_are_found_at_parse_time(source: str, message: str) -> None:
    with pytest.raises(TemplateSyntaxError, match=message):
        parse(source)


def test_template_data_must_be_a_json_object() -> None:
    assert parse_data("") == {}
    assert parse_data('{"a": 1}') == {"a": 1}
    for bad in ("[1]", "{not json", '"text"'):
        with pytest.raises(ValueError):
            parse_data(bad)


def test_no_code_runs_from_templates_or_data() -> None:
    # Names are data paths only: attribute access and calls are not part of the language.
    for source in ("{{__class__}}", "{{x.__class__}}", "{{x()}}", "{{x[0]}}"):
        try:
            result = render(source, {"x": "s"})
        except (TemplateSyntaxError, RenderError):
            continue
        pytest.fail(f"{source} rendered {result!r}")
