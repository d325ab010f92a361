"""Chat templates: the Jinja templates Hugging Face tokenizers ship to turn a conversation into text.

A template is untrusted code from a model folder, so it runs in Jinja's immutable sandbox. The
environment follows what chat templates are written against: blocks trimmed (`trim_blocks`,
`lstrip_blocks`), `{% break %}`/`{% continue %}`, a `tojson` filter that leaves non-ASCII text
and HTML characters alone, `raise_exception(message)` and `strftime_now(format)`. The
`{% generation %}` tag (which marks assistant text for some trainers) renders its body.
"""

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import require
from ..data import TokenizerError

_MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


@functools.cache
def _environment():
    jinja2 = require("jinja2", "hf")
    if _version(jinja2.__version__) < _MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2 >= {'.'.join(map(str, _MIN_JINJA))} (older releases have "
            f"sandbox escapes); found {jinja2.__version__}. Upgrade with `pip install -U jinja2`."
        )
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # `{% generation %}...{% endgeneration %}`: rendered as its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TokenizerError(f"the chat template refused the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", Generation]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    jinja2 = require("jinja2", "hf")
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"the chat template does not parse (line {err.lineno}): {err.message}") from None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a list of dicts, each with a string `role`; a `TokenizerError` otherwise."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TokenizerError(
            "a conversation is a list of messages such as [{'role': 'user', 'content': 'Hi'}]; got "
            f"{type(messages).__name__}."
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizerError(
                f"message {i} of the conversation must be a dict with a string 'role' (and usually "
                f"'content'); got {message!r}."
            )
        out.append(dict(message))
    return out


def render(template: str, messages: list[dict[str, Any]], special: Mapping[str, str], *, add_generation_prompt: bool, **kwargs: Any) -> str:
    """The text of `messages` under `template`, with the tokenizer's special-token strings
    (`bos_token`, ...) and `kwargs` (e.g. `tools`, or a template's own switches) as variables."""
    jinja2 = require("jinja2", "hf")
    variables = {**special, **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
    try:
        return _compile(template).render(**variables)
    except TokenizerError:
        raise
    except jinja2.TemplateError as err:
        raise TokenizerError(f"the chat template failed while rendering: {err}") from None


def assistant_spans(template: str, messages: list[dict[str, Any]], special: Mapping[str, str], **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """The text of the whole conversation and, for each assistant message, the character span
    the template renders for it after its generation prompt (the reply and whatever closes the
    turn, such as an end-of-turn token).

    Found by rendering the conversation up to each reply with the generation prompt and through
    it without; a template that renders an earlier turn differently once later turns exist (one
    that drops earlier reasoning, say) has no such spans, and a `TokenizerError` says so."""
    full = render(template, messages, special, add_generation_prompt=False, **kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, messages[:i], special, add_generation_prompt=True, **kwargs)
        through = render(template, messages[: i + 1], special, add_generation_prompt=False, **kwargs)
        if not (through.startswith(before) and full.startswith(through)):
            raise TokenizerError(
                f"cannot tell which tokens are assistant message {i}'s: the chat template does not "
                "render the conversation up to that reply as a prefix of the whole (templates that "
                "rewrite earlier turns, e.g. dropping earlier reasoning, do this). Build the mask "
                "yourself, or train on one reply per conversation (the last one)."
            )
        spans.append((len(before), len(through)))
    return full, spans
