"""Hugging Face `tokenizer.json` files, read with the `tokenizers` library."""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, no_type_check

import numpy as np
from jaxtyping import Bool, Int, Integer

from .._errors import require
from ..data import AbstractTokenizer, TokenizerError
from ._chat import assistant_spans, check_messages, render
from ._errors import HFFormatError
from ._files import TOKENIZER_NAME, read_json_object

_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


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


class HFTokenizer(AbstractTokenizer):
    """A Hugging Face fast tokenizer (`tokenizers.Tokenizer`) behind eqzoo's tokenizer protocol.

    `encode` gives int32 numpy ids ready for `eqzoo.generate`; `decode` turns ids back into
    text. The special tokens named in `tokenizer_config.json` (or, for older folders,
    `special_tokens_map.json`) are
    available as `bos_token_id`, `eos_token_id`, `pad_token_id` and `unk_token_id` (`None` when
    unknown). A chat model's template (`chat_template.jinja`, or `chat_template` in
    `tokenizer_config.json`; several named ones as a dict) is `chat_template`: [`eqzoo.hf.HFTokenizer.apply_chat_template`][]
    renders conversations with it and [`eqzoo.hf.HFTokenizer.encode_chat`][] gives the tokens
    and the assistant-token mask for fine-tuning.
    """

    def __init__(
        self, tokenizer: Any, special_tokens: Mapping[str, str] | None = None,
        chat_template: str | Mapping[str, str] | None = None,
    ):
        """**Arguments:**

        - `tokenizer`: a `tokenizers.Tokenizer`.
        - `special_tokens`: optional `{"eos_token": "</s>", ...}` naming the special tokens.
        - `chat_template`: optional Jinja chat template (Hugging Face's format), or several by
          name (`"default"`, and `"tool_use"` for calls with tools, as transformers picks them).
        """
        self.tokenizer = tokenizer
        self._special = {k: v for k, v in dict(special_tokens or {}).items() if k in _SPECIAL}
        if isinstance(chat_template, Mapping):
            chat_template = dict(chat_template)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in chat_template.items()):
                raise TokenizerError("chat_template given by name must map names to template strings.")
        elif chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"chat_template must be a string (a Jinja template), got {type(chat_template).__name__}.")
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "HFTokenizer":
        """Read a `tokenizer.json` file (and `tokenizer_config.json` and `special_tokens_map.json`
        beside it, if present; where both name a special token, `special_tokens_map.json` wins,
        as in transformers)."""
        tokenizers = require("tokenizers", "hf")
        file = Path(path)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises a bare Exception on malformed files
            raise HFFormatError(f"cannot read {str(file)!r} as a tokenizers tokenizer.json: {err}") from None
        special: dict[str, str] = {}
        config: dict[str, Any] = {}
        # tokenizer_config.json names the special tokens; older folders (and some published
        # ones) name them in special_tokens_map.json, which transformers reads after it: where
        # both name one, special_tokens_map.json's wins, as in transformers 4 and 5.
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = file.with_name(name)
            if not path.is_file():
                continue
            data = read_json_object(path)
            for key in _SPECIAL:
                token = _token_string(data.get(key))
                if token is not None:
                    special[key] = token
            if name == "tokenizer_config.json":
                config = data
        return cls(tokenizer, special, _read_chat_template(file.parent, config))

    def _special_id(self, key: str) -> int | None:
        token = self._special.get(key)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        """The id of the beginning-of-sequence token, if known."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The id of the end-of-sequence token, if known."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """The id of the padding token, if known."""
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        """The id of the unknown token, if known."""
        return self._special_id("unk_token")

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> Int[np.ndarray, " seq"]:
        """Token ids of `text` as an int32 array (with the tokenizer's own special tokens, such
        as Llama's BOS, unless `add_special_tokens=False`)."""
        if not isinstance(text, str):
            raise TokenizerError(f"HFTokenizer.encode takes a str, got {type(text).__name__}.")
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return np.asarray(ids, dtype=np.int32)

    @no_type_check  # checked below with a message that says how to fix the call
    def decode(self, ids: Integer[np.ndarray, " seq"] | Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of one sequence of token ids."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(
                f"HFTokenizer.decode takes one 1-d sequence of integer ids; got shape {arr.shape} "
                f"and dtype {arr.dtype}. Decode one row at a time."
            )
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise TokenizerError(f"token ids must lie in [0, {self.vocab_size}); got ids from {arr.min()} to {arr.max()}.")
        return self.tokenizer.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)

    def _template(self, who: str, tools: Any = None) -> str:
        template = self.chat_template
        if template is None:
            raise TokenizerError(
                f"HFTokenizer.{who}: this tokenizer has no chat template (neither chat_template.jinja "
                "nor a chat_template in tokenizer_config.json); base models usually have none. Pass "
                "one as HFTokenizer(..., chat_template=...) or format the text yourself."
            )
        if isinstance(template, str):
            return template
        # As transformers picks among named templates: "tool_use" when tools are given.
        name = "tool_use" if tools is not None and "tool_use" in template else "default"
        if name not in template:
            raise TokenizerError(
                f"HFTokenizer.{who}: this tokenizer's chat templates are {sorted(template)}, none named "
                "'default'; pass the one to use as chat_template=tokenizer.chat_template[name]."
            )
        return template[name]

    def _special_strings(self) -> dict[str, str]:
        return dict(self._special)

    @no_type_check  # check_messages says how to fix a bad conversation
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> Int[np.ndarray, " seq"] | str:
        """A conversation rendered with the model's chat template, as token ids (or text).

        Renders as Hugging Face's `apply_chat_template` does (Jinja's sandbox, the special-token
        strings `bos_token`, `eos_token`, `pad_token`, `unk_token` as variables) and encodes
        the text without adding special tokens again (the template writes them).

        **Arguments:**

        - `messages`: a list of `{"role": ..., "content": ...}` dicts.
        - `add_generation_prompt`: end with the header of an assistant turn, so that the model
          writes the reply (for generation).
        - `continue_final_message`: end right after the last message's content, without what
          closes its turn, so that the model continues it (a reply begun for it, say).
        - `tokenize`: `False` returns the text.
        - `template_kwargs`: more template variables: `tools=[...]`, or a template's own switches
          (Qwen3's `enable_thinking=False`, say).

        **Returns:** int32 token ids, or the text.

        **Raises:** `TokenizerError` when there is no template, a message is malformed, or the
        template fails (its `raise_exception` message included).
        """
        messages = check_messages(messages)
        if add_generation_prompt and continue_final_message:
            raise TokenizerError(
                "apply_chat_template: add_generation_prompt starts a new assistant turn and "
                "continue_final_message continues the last one; ask for one of them."
            )
        template = self._template("apply_chat_template", template_kwargs.get("tools"))
        text = render(
            template, messages, self._special_strings(), add_generation_prompt=bool(add_generation_prompt), **template_kwargs,
        )
        if continue_final_message:
            content = messages[-1].get("content")
            if not isinstance(content, str) or not content.strip() or content.strip() not in text:
                raise TokenizerError(
                    "apply_chat_template(continue_final_message=True) needs the last message's text "
                    "content as the template renders it; it was not found in the rendered text."
                )
            text = text[: text.rindex(content.strip()) + len(content.strip())]
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @no_type_check  # check_messages says how to fix a bad conversation
    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], **template_kwargs: Any
    ) -> tuple[Int[np.ndarray, " seq"], Bool[np.ndarray, " seq"]]:
        """A conversation's token ids and which of them the assistant wrote: a fine-tuning
        example.

        The mask is `True` for the assistant's tokens, `False` for the system and user turns and
        the headers: the tokens a supervised fine-tune trains on. Pass the pairs to
        [`eqzoo.data.pack_documents`][] as documents and `target_masks`. Which text is the
        assistant's:

        - a template with `{% generation %}...{% endgeneration %}` blocks marks it: the blocks'
          text (the same mask as transformers' `return_assistant_tokens_mask`);
        - otherwise each assistant turn after its generation prompt (the reply and what closes
          the turn, such as `<|im_end|>` and the newline after it), found by rendering the
          conversation up to each reply and through it. A template that writes a reply other
          than as its generation prompt begins it (a prompt that opens a thinking block), or
          that renders earlier turns differently once later ones exist (one that drops earlier
          reasoning), has no such spans: a `TokenizerError` says which, and what to do.

        A token that straddles the edge of the assistant's text counts as the assistant's.

        **Arguments:** `messages`, as for [`eqzoo.hf.HFTokenizer.apply_chat_template`][];
        `template_kwargs`, more template variables.

        **Returns:** `(tokens, mask)`: int32 ids and a boolean mask of the same length.
        """
        for name in ("add_generation_prompt", "continue_final_message"):
            if name in template_kwargs:
                raise TokenizerError(
                    f"encode_chat renders whole conversations for training; {name} is for "
                    "apply_chat_template (generation)."
                )
        template = self._template("encode_chat", template_kwargs.get("tools"))
        text, spans = assistant_spans(template, check_messages(messages), self._special_strings(), **template_kwargs)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        tokens = np.asarray(encoding.ids, dtype=np.int32)
        mask = np.zeros(tokens.shape, dtype=bool)
        if spans and tokens.size:
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            for start, end in spans:
                mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        return tokens, mask

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "hf", "tokenizer_json": ..., "special_tokens": {...}, "chat_template": ...}`,
        JSON-able."""
        return {
            "type": "hf", "tokenizer_json": self.tokenizer.to_str(), "special_tokens": dict(self._special),
            "chat_template": self.chat_template,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HFTokenizer":
        """Rebuild from the output of `to_dict()`."""
        if not isinstance(d, Mapping) or d.get("type") != "hf" or "tokenizer_json" not in d:
            raise TokenizerError("HFTokenizer.from_dict needs the output of HFTokenizer.to_dict() (type 'hf').")
        tokenizers = require("tokenizers", "hf")
        return cls(tokenizers.Tokenizer.from_str(d["tokenizer_json"]), d.get("special_tokens"), d.get("chat_template"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.tokenizer.to_str())

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike[str]) -> HFTokenizer:
    """Load the Hugging Face fast tokenizer of a local checkpoint.

    **Arguments:** `path`, a checkpoint folder holding `tokenizer.json`, or that file itself.

    **Returns:** an [`eqzoo.hf.HFTokenizer`][].

    **Raises:** `HFFormatError` when there is no `tokenizer.json` (slow-tokenizer files such as
    `vocab.json` + `merges.txt` or `tokenizer.model` alone are not read: convert them once with
    `transformers.AutoTokenizer.from_pretrained(path).save_pretrained(path)`, which writes
    `tokenizer.json`), or when it cannot be parsed.
    """
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
    return HFTokenizer.from_file(file)
