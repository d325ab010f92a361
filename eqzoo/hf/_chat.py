"""Chat templates: the Jinja templates Hugging Face tokenizers ship to turn a conversation into text.

A template is untrusted code from a model folder, so it runs in Jinja's immutable sandbox. The
environment follows what chat templates are written against: blocks trimmed (`trim_blocks`,
`lstrip_blocks`), `{% break %}`/`{% continue %}`, a `tojson` filter that leaves non-ASCII text
and HTML characters alone, `raise_exception(message)` and `strftime_now(format)`. The
`{% generation %}` tag (which marks assistant text for some trainers) renders its body.
"""

import contextvars
import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import require
from ..data import TokenizerError

_MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# The spans `{% generation %}` blocks render, while a tracked render runs: (rendered pieces so
# far, spans found).
_TRACKING: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "eqzoo_chat_generation", default=None
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _generation_extension():
    """Jinja's `{% generation %}...{% endgeneration %}` tag: rendered as its body; inside a
    tracked render the body's character span is recorded (the assistant's text, for
    encode_chat). A class made on first use, as jinja2 is an optional dependency."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                pieces, spans = tracking
                start = sum(map(len, pieces))
                spans.append((start, start + len(text)))
            return text

    return Generation


def _safe_namespace():
    """Jinja's `namespace`, refusing underscore names (a stored `__html__` would be called by
    the escape filter outside the sandbox's call checks). A class made on first use, as jinja2
    is an optional dependency."""
    from jinja2.exceptions import SecurityError
    from jinja2.utils import Namespace

    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a chat template may not store {name!r} on a namespace (names starting with '_').")

    class SafeNamespace(Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _check_name(name)
            Namespace.__setitem__(self, name, value)

    return SafeNamespace


def _raise_exception(message):
    # templates call raise_exception(message) to refuse a conversation they cannot render
    raise TokenizerError(f"the chat template refused the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: non-ASCII text and HTML characters left as they are (Jinja's own
    # filter escapes them for HTML)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_dict(*args, **kwargs):
    # A function, not Python's `dict` type: `dict.update(...)` would mutate the caller's data.
    return dict(*args, **kwargs)


@functools.cache
def _environment():
    """The one sandboxed Jinja environment every chat template compiles in (see the module
    docstring for what it offers)."""
    jinja2 = require("jinja2", "hf")
    if _version(jinja2.__version__) < _MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2 >= {'.'.join(map(str, _MIN_JINJA))} (older releases have "
            f"sandbox escapes); found {jinja2.__version__}. Upgrade with `pip install -U jinja2`."
        )
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_extension()]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["namespace"] = _safe_namespace()
    env.globals["dict"] = _make_dict
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    jinja2 = require("jinja2", "hf")
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"the chat template does not parse (line {err.lineno}): {err.message}") from None


def plain(value: Any, where: str) -> Any:
    """`value` rebuilt from JSON-like types only (dicts with string keys, lists, strings,
    numbers, booleans, `None`; numpy scalars and arrays become numbers and lists), so that a
    template sees data, never the caller's objects and their methods."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TokenizerError(f"{where}: chat template data needs string keys; got {key!r}.")
            out[key] = plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TokenizerError(
        f"{where} is a {type(value).__name__}; a chat template takes JSON-like data (dicts, lists, "
        "strings, numbers, booleans, None). Pass tools as JSON schemas, not Python functions."
    )


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as plain data (see `plain`), each a dict with a string `role`; keys whose
    value is `None` dropped (as transformers does: `"content": None` on a tool-call message
    means no content). A `TokenizerError` otherwise."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TokenizerError(
            "a conversation is a list of messages such as [{'role': 'user', 'content': 'Hi'}]; got "
            f"{type(messages).__name__}."
        )
    if not messages:
        raise TokenizerError("the conversation is empty; give at least one message.")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizerError(
                f"message {i} of the conversation must be a dict with a string 'role' (and usually "
                f"'content'); got {message!r}."
            )
        out.append({k: v for k, v in plain(message, f"message {i}").items() if v is not None})
    return out


def render(
    template: str, messages: list[dict[str, Any]], special: Mapping[str, str], *, add_generation_prompt: bool,
    track: bool = False, **kwargs: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """The text of `messages` under `template`, with the tokenizer's special-token strings
    (`bos_token`, ...), `tools` and `documents` (default `None`) and `kwargs` (a template's own
    switches) as variables, all as plain data. With `track`, also the spans of its
    `{% generation %}` blocks."""
    jinja2 = require("jinja2", "hf")
    extra = {"tools": None, "documents": None} | {k: plain(v, f"template variable {k!r}") for k, v in kwargs.items()}
    variables = {**special, **extra, "messages": messages, "add_generation_prompt": add_generation_prompt}
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACKING.set((pieces, spans) if track else None)
    try:
        for piece in _compile(template).generate(**variables):
            pieces.append(piece)
    except TokenizerError:
        raise
    except jinja2.TemplateError as err:
        raise TokenizerError(f"the chat template failed while rendering: {err}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as err:
        raise TokenizerError(
            f"the chat template failed while rendering ({type(err).__name__}: {err}); check the "
            "messages have the fields and types this template expects."
        ) from None
    finally:
        _TRACKING.reset(token)
    text = "".join(pieces)
    return (text, spans) if track else text


def assistant_spans(template: str, messages: list[dict[str, Any]], special: Mapping[str, str], **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """The text of the whole conversation and the character spans of the assistant's text.

    A template with `{% generation %}` blocks marks them itself: their spans. Otherwise each
    assistant message's span runs from the end of the conversation rendered up to it with the
    generation prompt to the end of it rendered through the reply (the reply and what closes
    the turn). That needs the template to write a reply as its generation prompt begins it and
    to render earlier turns the same once later turns exist; a `TokenizerError` says which of
    the two fails."""
    if _GENERATION_TAG.search(template):
        return render(template, messages, special, add_generation_prompt=False, track=True, **kwargs)
    full = render(template, messages, special, add_generation_prompt=False, **kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, messages[:i], special, add_generation_prompt=True, **kwargs)
        through = render(template, messages[: i + 1], special, add_generation_prompt=False, **kwargs)
        if not through.startswith(before):
            raise TokenizerError(
                f"cannot tell which tokens are assistant message {i}'s: the template writes the reply "
                "differently from the generation prompt it gives (a prompt that opens a thinking "
                "block, say). Mark the assistant's text with {% generation %}...{% endgeneration %} "
                "in the template (HFTokenizer(..., chat_template=...)), or build the mask yourself."
            )
        if not full.startswith(through):
            raise TokenizerError(
                f"cannot tell which tokens are assistant message {i}'s: the template renders the "
                "conversation up to that reply differently once later turns follow (it rewrites "
                "earlier turns, e.g. dropping earlier reasoning). Make one example per reply (each "
                "conversation ending at its reply), or mark the assistant's text with {% generation %} tags."
            )
        spans.append((len(before), len(through)))
    return full, spans
