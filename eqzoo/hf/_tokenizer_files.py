"""Finding and reading a tokenizer's files: `tokenizer.json`, the special tokens and padding
settings of `tokenizer_config.json` and `special_tokens_map.json`, and the chat templates."""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import require
from . import _batch
from ._errors import HFFormatError
from ._files import TOKENIZER_NAME, read_json_object

SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _token_string(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or as {"content": ...}.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_chat_template(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    # transformers 5 writes the template to chat_template.jinja (and named ones to
    # additional_chat_templates/{name}.jinja); older folders keep it in tokenizer_config.json,
    # as a string or a list of {"name", "template"} entries.
    named: dict[str, str] = {}
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template if isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
    elif isinstance(template, str):
        named["default"] = template
    file = folder / "chat_template.jinja"
    if file.is_file():
        named["default"] = file.read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            named[path.stem] = path.read_text(encoding="utf-8")
    if not named:
        return None
    return named["default"] if set(named) == {"default"} else named


def find_tokenizer_file(path: str | os.PathLike[str]) -> Path:
    """The `tokenizer.json` of a checkpoint folder, or `path` itself when it names the file;
    `HFFormatError`, with how to write one, where there is none."""
    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_NAME
    if not file.is_file():
        folder = file.parent
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise HFFormatError(
            f"no {TOKENIZER_NAME} at {str(file)!r} (found: {found}). eqzoo reads fast tokenizers only; "
            "if the folder has slow-tokenizer files (vocab.json + merges.txt, tokenizer.model), write "
            "tokenizer.json once with `transformers.AutoTokenizer.from_pretrained(path).save_pretrained(path)`."
        )
    return file


def read_tokenizer_file(
    path: str | os.PathLike[str],
) -> tuple[Any, dict[str, str], str | dict[str, str] | None, dict[str, str]]:
    """`(tokenizer, special_tokens, chat_template, sides)` read from a `tokenizer.json` file and
    the `tokenizer_config.json` and `special_tokens_map.json` beside it: `HFTokenizer`'s
    arguments, `sides` its `padding_side` and `truncation_side`."""
    tokenizers = require("tokenizers", "hf")
    file = Path(path)
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception on malformed files
        raise HFFormatError(f"cannot read {str(file)!r} as a tokenizers tokenizer.json: {err}") from None
    special: dict[str, str] = {}
    config: dict[str, Any] = {}
    # A tokenizer.json may carry its own padding settings; transformers takes its pad token
    # and side as defaults, under tokenizer_config.json's.
    json_padding = tokenizer.padding or {}
    if isinstance(json_padding.get("pad_token"), str) and tokenizer.token_to_id(json_padding["pad_token"]) is not None:
        special["pad_token"] = json_padding["pad_token"]
    padding_side = json_padding.get("direction", "right")
    truncation_side = (tokenizer.truncation or {}).get("direction", "right")  # likewise, as transformers reads it
    # ...but a single encode neither pads nor truncates unless asked, as in transformers
    # (encode_batch sets both for its call).
    tokenizer.no_padding()
    tokenizer.no_truncation()
    # tokenizer_config.json names the special tokens; older folders (and some published
    # ones) name them in special_tokens_map.json, which transformers reads after it: where
    # both name one, special_tokens_map.json's wins, as in transformers 4 and 5.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = file.with_name(name)
        if not path.is_file():
            continue
        data = read_json_object(path)
        for key in SPECIAL:
            token = _token_string(data.get(key))
            if token is not None:
                special[key] = token
        if name == "tokenizer_config.json":
            config = data
    sides = {"padding_side": config.get("padding_side", padding_side), "truncation_side": config.get("truncation_side", truncation_side)}
    for name, side in sides.items():
        if side not in _batch.SIDES:
            raise HFFormatError(f"{str(file.with_name('tokenizer_config.json'))!r}: {name} must be 'right' or 'left'; got {side!r}.")
    return tokenizer, special, _read_chat_template(file.parent, config), sides
