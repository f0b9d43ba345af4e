"""A small handlebars-like template engine for email templates (no eval, no code from templates).

Syntax (docs/sending.md's "Templates" section documents it for users):
  {{name}}  {{user.first}}           a value, HTML-escaped in the HTML part; missing: a rendering failure
  {{{name}}}                          the same, never escaped
  {{default name "friend"}}          `name`, or the literal when it is missing, null or ""
  {{#if x}}..{{else}}..{{/if}}       `x` is false for false, null, 0, "", [] and a missing value
  {{#unless x}}..{{/unless}}
  {{#each items}}..{{this}} {{name}} {{@index}} {{@first}} {{@last}} {{@key}}..{{else}}..{{/each}}
  {{! comment }}  {{!-- comment --}}
Names are looked up in the innermost scope first ({{#each}} item), then outwards to the data's root.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class TemplateSyntaxError(ValueError):
    """The template itself is malformed (found when a template is stored, or tested)."""


class RenderError(ValueError):
    """The data does not fit the template (SES's RenderingFailure)."""


# Bounds on one rendering, so a small template cannot expand without end (an 81-byte template of
# nested {{#each}} once rendered 13 million characters) nor hold a worker for long.
MAX_BLOCK_DEPTH = 16  # {{#if}}/{{#unless}}/{{#each}} blocks inside one another
MAX_DATA_DEPTH = 32  # arrays and objects inside one another in template data
MAX_OUTPUT_CHARS = 4 * 1024 * 1024  # of one rendered part (subject, text or HTML)
MAX_RENDER_SECONDS = 2.0  # of one rendered part


class _Budget:
    """What a rendering may still use: characters of output, and time until its deadline."""

    def __init__(self, max_chars: int, seconds: float) -> None:
        self.left = max_chars
        self.max_chars = max_chars
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.steps = 0

    def spend(self, chars: int) -> None:
        self.left -= chars
        if self.left < 0:
            raise RenderError(f"The rendered template is longer than {self.max_chars} characters.")
        self.steps += 1
        if self.steps % 256 == 0 and time.monotonic() > self.deadline:
            raise RenderError(f"Rendering the template took longer than {self.seconds:g} seconds.")


_PATH = re.compile(r"^(?:this|@index|@first|@last|@key|(?:this\.)?[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)$")
_STRING = re.compile(r'^"((?:[^"\\]|\\.)*)"$')
_TAG = re.compile(r"\{\{\{(.*?)\}\}\}|\{\{!--(.*?)--\}\}|\{\{(.*?)\}\}", re.DOTALL)


@dataclass
class _Text:
    text: str


@dataclass
class _Value:
    path: str
    escape: bool
    fallback: str | None  # set for {{default path "literal"}}
    where: str


@dataclass
class _Block:
    helper: str  # if, unless, each
    path: str
    where: str
    body: list[_Node] = field(default_factory=list)
    otherwise: list[_Node] = field(default_factory=list)
    in_else: bool = False


_Node = _Text | _Value | _Block


def _position(source: str, offset: int) -> str:
    line = source.count("\n", 0, offset) + 1
    column = offset - (source.rfind("\n", 0, offset) + 1) + 1
    return f"line {line}, column {column}"


def _check_path(path: str, where: str) -> str:
    if not _PATH.match(path):
        raise TemplateSyntaxError(f"{path!r} is not a valid variable name ({where}).")
    return path


def _parse_value(expression: str, escape: bool, where: str) -> _Value:
    words = expression.split(None, 1)
    if not words:
        raise TemplateSyntaxError(f"Empty tag ({where}).")
    if words[0] == "default":
        rest = words[1].strip() if len(words) > 1 else ""
        path, _, literal = rest.partition(" ")
        match = _STRING.match(literal.strip())
        if not path or match is None:
            raise TemplateSyntaxError(f'Use {{{{default name "text"}}}} ({where}).')
        return _Value(_check_path(path, where), escape, _unquote(match.group(1)), where)
    if len(words) > 1:
        raise TemplateSyntaxError(f"Unknown helper {words[0]!r} ({where}).")
    return _Value(_check_path(words[0], where), escape, None, where)


def _unquote(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal)


@dataclass(frozen=True)
class Template:
    """A parsed template: parse once (syntax errors surface here), render many times."""

    nodes: tuple[_Node, ...]

    def render(
        self,
        data: Mapping[str, Any],
        *,
        escape_html: bool,
        max_chars: int = MAX_OUTPUT_CHARS,
        seconds: float = MAX_RENDER_SECONDS,
    ) -> str:
        out = _Output(_Budget(max_chars, seconds))
        _render(list(self.nodes), [_Scope(data)], escape_html, out)
        return "".join(out.parts)


class _Output:
    def __init__(self, budget: _Budget) -> None:
        self.parts: list[str] = []
        self.budget = budget

    def append(self, text: str) -> None:
        self.budget.spend(len(text))
        self.parts.append(text)


def parse(source: str) -> Template:
    root: list[_Node] = []
    stack: list[_Block] = []

    def target() -> list[_Node]:
        if not stack:
            return root
        block = stack[-1]
        return block.otherwise if block.in_else else block.body

    position = 0
    for match in _TAG.finditer(source):
        if match.start() > position:
            target().append(_Text(source[position : match.start()]))
        position = match.end()
        where = _position(source, match.start())
        raw, long_comment, tag = match.group(1), match.group(2), match.group(3)
        if long_comment is not None:
            continue
        if raw is not None:
            target().append(_parse_value(raw.strip(), False, where))
            continue
        tag = tag.strip()
        if tag.startswith("!"):
            continue
        if tag.startswith("#"):
            helper, _, path = tag[1:].partition(" ")
            if helper not in ("if", "unless", "each"):
                raise TemplateSyntaxError(f"Unknown block helper {{{{#{helper}}}}} ({where}).")
            block = _Block(helper, _check_path(path.strip(), where), where)
            if len(stack) >= MAX_BLOCK_DEPTH:
                raise TemplateSyntaxError(f"Blocks are nested more than {MAX_BLOCK_DEPTH} deep ({where}).")
            target().append(block)
            stack.append(block)
        elif tag.startswith("/"):
            helper = tag[1:].strip()
            if not stack:
                raise TemplateSyntaxError(f"{{{{/{helper}}}}} closes no block ({where}).")
            if stack[-1].helper != helper:
                raise TemplateSyntaxError(
                    f"{{{{/{helper}}}}} does not close {{{{#{stack[-1].helper}}}}} "
                    f"opened at {stack[-1].where} ({where})."
                )
            stack.pop()
        elif tag == "else":
            if not stack or stack[-1].in_else:
                raise TemplateSyntaxError(f"{{{{else}}}} outside an {{{{#if}}}} or {{{{#each}}}} ({where}).")
            stack[-1].in_else = True
        else:
            target().append(_parse_value(tag, True, where))
    rest = source[position:]
    if "{{" in rest:
        raise TemplateSyntaxError(f"Unclosed tag ({_position(source, position + rest.index('{{'))}).")
    if rest:
        target().append(_Text(rest))
    if stack:
        raise TemplateSyntaxError(f"{{{{#{stack[-1].helper}}}}} opened at {stack[-1].where} is never closed.")
    return Template(tuple(root))


_MISSING = object()


@dataclass
class _Scope:
    value: Any
    index: int = 0
    count: int = 0
    key: str | None = None


def _lookup(path: str, scopes: list[_Scope]) -> Any:
    scope = scopes[-1]
    if path == "this":
        return scope.value
    if path == "@index":
        return scope.index
    if path == "@first":
        return scope.index == 0
    if path == "@last":
        return scope.index == scope.count - 1
    if path == "@key":
        return scope.key if scope.key is not None else _MISSING
    parts = path.split(".")
    if parts[0] == "this":
        candidates: Sequence[_Scope] = [scope]
        parts = parts[1:]
    else:
        candidates = list(reversed(scopes))
    for candidate in candidates:
        value = candidate.value
        for part in parts:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            else:
                value = _MISSING
                break
        if value is not _MISSING:
            return value
    return _MISSING


def _truthy(value: Any) -> bool:
    if value is _MISSING or value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list)):
        return len(value) > 0
    return True


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _escape(text: str) -> str:
    # Handlebars escapes the same characters: & < > " ' ` =
    return html.escape(text, quote=True).replace("`", "&#x60;").replace("=", "&#x3D;")


def _render(nodes: list[_Node], scopes: list[_Scope], escape_html: bool, out: _Output) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Value):
            value = _lookup(node.path, scopes)
            if node.fallback is not None and (value is _MISSING or value is None or value == ""):
                value = node.fallback
            if value is _MISSING:
                raise RenderError(f"Attribute '{node.path}' is not present in the rendering data.")
            text = _text(value)
            out.append(_escape(text) if escape_html and node.escape else text)
        elif node.helper == "each":
            _render_each(node, scopes, escape_html, out)
        else:
            condition = _truthy(_lookup(node.path, scopes))
            if node.helper == "unless":
                condition = not condition
            _render(node.body if condition else node.otherwise, scopes, escape_html, out)


def _render_each(node: _Block, scopes: list[_Scope], escape_html: bool, out: _Output) -> None:
    value = _lookup(node.path, scopes)
    items: list[tuple[str | None, Any]]
    if value is _MISSING or value is None:
        items = []
    elif isinstance(value, list):
        items = [(None, item) for item in value]
    elif isinstance(value, Mapping):
        items = [(str(key), item) for key, item in value.items()]
    else:
        raise RenderError(f"'{node.path}' is not a list or an object, so {{{{#each}}}} cannot walk it.")
    if not items:
        _render(node.otherwise, scopes, escape_html, out)
        return
    for index, (key, item) in enumerate(items):
        out.budget.spend(0)  # an {{#each}} that writes nothing still takes time
        _render(node.body, [*scopes, _Scope(item, index, len(items), key)], escape_html, out)


def parse_data(text: str) -> dict[str, Any]:
    """Template data: a JSON object (empty text is an empty object). ValueError when it is not one."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except RecursionError:
        data = None
        depth = MAX_DATA_DEPTH + 1
    else:
        depth = _depth(data)
    if depth > MAX_DATA_DEPTH:
        raise ValueError(f"arrays and objects are nested more than {MAX_DATA_DEPTH} deep")
    if not isinstance(data, dict):
        raise ValueError("template data must be a JSON object")
    return data


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_DATA_DEPTH:
            return deepest
        stack += [(child, depth + 1) for child in children]
    return deepest
