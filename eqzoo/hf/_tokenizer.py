"""`HFTokenizer`: a Hugging Face fast tokenizer behind eqzoo's tokenizer protocol, and
`load_tokenizer`. Reading its files is `_tokenizer_files`'s; its batch and chat paths are
`_batch`'s and `_tokenizer_chat`'s."""

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, no_type_check

import numpy as np
from jax import Array
from jaxtyping import Bool, Int, Integer

from .._errors import as_flag, require
from ..data import AbstractTokenizer, EncodedBatch, StreamDecoder, TokenizerError
from . import _batch, _tokenizer_chat
from ._tokenizer_files import SPECIAL, find_tokenizer_file, read_tokenizer_file


class HFTokenizer(AbstractTokenizer):
    """A Hugging Face fast tokenizer (`tokenizers.Tokenizer`) behind eqzoo's tokenizer protocol.

    `encode` gives int32 numpy ids ready for `eqzoo.generate`; `decode` turns ids back into
    text. [`eqzoo.hf.HFTokenizer.encode_batch`][] encodes and pads a batch with the
    `tokenizers` library's own batch encoder (ids and attention mask equal to transformers'
    `tokenizer(texts, padding=...)`), ready for [`eqzoo.generation.generate_batch`][]'s
    `attention_mask`; [`eqzoo.hf.HFTokenizer.decode_batch`][] decodes it back. The special tokens named in `tokenizer_config.json` (or, for older folders,
    `special_tokens_map.json`) are
    available as `bos_token_id`, `eos_token_id`, `pad_token_id` and `unk_token_id` (`None` when
    unknown). A chat model's template (`chat_template.jinja`, or `chat_template` in
    `tokenizer_config.json`; several named ones as a dict) is `chat_template`: [`eqzoo.hf.HFTokenizer.apply_chat_template`][]
    renders conversations with it and [`eqzoo.hf.HFTokenizer.encode_chat`][] gives the tokens
    and the assistant-token mask for fine-tuning.
    """

    def __init__(
        self, tokenizer: Any, special_tokens: Mapping[str, str] | None = None,
        chat_template: str | Mapping[str, str] | None = None, *, padding_side: str = "right",
        truncation_side: str = "right",
    ):
        """**Arguments:**

        - `tokenizer`: a `tokenizers.Tokenizer`.
        - `special_tokens`: optional `{"eos_token": "</s>", ...}` naming the special tokens;
          `"pad_token"` is what `encode_batch` pads with.
        - `chat_template`: optional Jinja chat template (Hugging Face's format), or several by
          name (`"default"`, and `"tool_use"` for calls with tools, as transformers picks them).
        - `padding_side`: `"right"` or `"left"`, the side `encode_batch` pads on by default
          (`tokenizer_config.json`'s `padding_side`).
        - `truncation_side`: `"right"` (keep each text's start) or `"left"` (keep its end),
          the side `encode_batch(..., truncation=True)` cuts on by default
          (`tokenizer_config.json`'s `truncation_side`).

        `tokenizer` is shared by every call and never reconfigured: `encode_batch` pads and
        truncates with one copy of it, reconfigured per call under its own lock, so single
        encodes from several threads need no lock.
        """
        self._padding_side = _batch.check_side(padding_side, "padding_side", "HFTokenizer")
        self._truncation_side = _batch.check_side(truncation_side, "truncation_side", "HFTokenizer")
        self.tokenizer = tokenizer
        self._batch_encoder = _batch.BatchEncoder()
        self._special = {k: v for k, v in dict(special_tokens or {}).items() if k in SPECIAL}
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
        tokenizer, special, chat_template, sides = read_tokenizer_file(path)
        return cls(tokenizer, special, chat_template, **sides)

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
    def padding_side(self) -> str:
        """The side `encode_batch` pads on unless told: `tokenizer_config.json`'s `padding_side`,
        else `"right"`."""
        return self._padding_side

    @property
    def truncation_side(self) -> str:
        """The side `encode_batch(..., truncation=True)` cuts on unless told:
        `tokenizer_config.json`'s `truncation_side` (else the direction of `tokenizer.json`'s
        own truncation, as transformers reads it), else `"right"`."""
        return self._truncation_side

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
        if (special := as_flag(add_special_tokens)) is None:
            raise TokenizerError(f"HFTokenizer.encode: add_special_tokens must be True or False; got {add_special_tokens!r}.")
        ids = self.tokenizer.encode(text, add_special_tokens=special).ids  # no lock: never reconfigured
        return np.asarray(ids, dtype=np.int32)

    @no_type_check  # checked with messages that say how to fix the call
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        padding: Literal["longest", "max_length"] = "longest",
        max_length: int | None = None,
        truncation: bool = False,
        truncation_side: Literal["right", "left"] | None = None,
        padding_side: Literal["right", "left"] | None = None,
        pad_to_multiple_of: int | None = None,
        pad_token_id: int | None = None,
        add_special_tokens: bool = True,
    ) -> EncodedBatch:
        """Encode several texts and pad them to one width, with the attention mask.

        The ids and mask equal transformers' `tokenizer(texts, padding=..., truncation=...,
        max_length=..., padding_side=..., pad_to_multiple_of=...)["input_ids"]` and
        `["attention_mask"]` (with its `truncation_side`), as int32 arrays: both come from the
        `tokenizers` library's batch encoder (parallel, in Rust), run on a copy of the tokenizer
        with this call's padding and truncation switched on (made on the first batch call and
        kept; batch calls take turns on it, and the shared tokenizer is never reconfigured).
        For decoding, pad on the left or the right and pass both to
        [`eqzoo.generation.generate_batch`][]:

        ```python
        batch = tokenizer.encode_batch(prompts, padding_side="left")
        out = generate_batch(model, batch.ids, attention_mask=batch.attention_mask,
                             max_new_tokens=32, pad_token=tokenizer.pad_token_id)
        ```

        **Arguments:**

        - `texts`: a list of strings.
        - `padding`: `"longest"` (transformers' `padding=True`) or `"max_length"`.
        - `max_length`: the width for `padding="max_length"` and the cut for `truncation`
          (special tokens included, as in transformers). Unlike transformers there is no
          `model_max_length` default: pass it.
        - `truncation`: cut texts longer than `max_length` tokens, keeping their start (or
          their end, with `truncation_side="left"`).
        - `truncation_side`: `"right"` or `"left"`, the side `truncation` cuts on; default
          [`eqzoo.hf.HFTokenizer.truncation_side`][].
        - `padding_side`: `"right"` or `"left"`; default [`eqzoo.hf.HFTokenizer.padding_side`][].
        - `pad_to_multiple_of`: round the width up to a multiple of this.
        - `pad_token_id`: the id to pad with; default the tokenizer's `pad_token_id`. A
          tokenizer without a pad token (GPT-2's and Llama's have none) is refused rather than
          padded with 0 or eos unasked: pass `pad_token_id=tokenizer.eos_token_id` (the mask
          hides the padding from the model) or set `pad_token` in `tokenizer_config.json`.
        - `add_special_tokens`: add the tokenizer's own special tokens (Llama's BOS, say), as
          `encode` does.

        **Returns:** an [`eqzoo.data.EncodedBatch`][]: `ids` and `attention_mask`, int32
        `(batch, seq)`, and `padding_side`.

        **Raises:** `TokenizerError` for a missing pad token, `truncation=True` or
        `padding="max_length"` without `max_length`, a text longer than `max_length` under
        `padding="max_length"` without `truncation`, or a malformed list of texts.
        """
        return _batch.encode_batch(
            self, texts, padding=padding, max_length=max_length, truncation=truncation,
            truncation_side=truncation_side, padding_side=padding_side,
            pad_to_multiple_of=pad_to_multiple_of, pad_token_id=pad_token_id, add_special_tokens=add_special_tokens,
        )

    @no_type_check  # checked below with a message that says how to fix the call
    def decode(self, ids: Integer[np.ndarray, " seq"] | Integer[Array, " seq"] | Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of one sequence of token ids.

        `skip_special_tokens` defaults to `False`, as in transformers: special tokens (eos, a
        chat template's `<|im_start|>`) are written out, so `decode(encode(text)) == text` for
        text that holds them. Padding is best removed with the mask
        ([`eqzoo.hf.HFTokenizer.decode_batch`][] takes it, or `decode(row[mask == 1])`), which
        works whether or not the pad token is special.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TokenizerError(
                f"HFTokenizer.decode takes one 1-d sequence of integer ids; got shape {arr.shape} "
                f"and dtype {arr.dtype}. Decode one row at a time, or a batch with decode_batch."
            )
        _batch.check_ids(arr, self.vocab_size)
        return self.tokenizer.decode([int(i) for i in arr], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder for one stream of ids (one row of
        [`eqzoo.generation.generate_stream`][]'s chunks): `push(ids)` returns the text the new
        ids complete, holding back a character cut between chunks (byte-level BPE) and decoding
        a SentencePiece "▁" after earlier text as the space it is there; `flush()` returns the
        rest. Joined, they are `decode(all ids, skip_special_tokens=...)` however the ids were
        split (see [`eqzoo.data.StreamDecoder`][]); each push costs the same however long the
        text so far.

        The `tokenizers` library's own `decoders.DecodeStream` is not used: it has no `flush`, so
        ids held back at the end (a reply cut inside a character) would never be written.

        **Arguments:**

        - `skip_special_tokens`: drop special tokens, as in [`eqzoo.hf.HFTokenizer.decode`][].

        **Returns:** a new [`eqzoo.data.StreamDecoder`][].
        """
        skip = bool(skip_special_tokens)
        return StreamDecoder(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip), self.vocab_size, "HFTokenizer")

    @no_type_check  # checked with messages that say how to fix the call
    def decode_batch(self, ids: Any, attention_mask: Any = None, *, skip_special_tokens: bool = False) -> list[str]:
        """Decode each row of a batch (with the `tokenizers` library's batch decoder); with
        `attention_mask`, without its padding.

        **Arguments:**

        - `ids`: `(batch, seq)` integer ids (NumPy or JAX), or a list of rows of any lengths.
        - `attention_mask`: optional 0/1 mask of `ids`' shape, such as an
          [`eqzoo.data.EncodedBatch`][]'s: only positions marked 1 are decoded, so a left- or
          right-padded batch decodes to its texts whichever its pad token.
        - `skip_special_tokens`: drop special tokens; `False` by default, as in transformers'
          `batch_decode` (see [`eqzoo.hf.HFTokenizer.decode`][]).

        **Returns:** a list of strings, one a row.
        """
        return _batch.decode_batch(self, ids, attention_mask, skip_special_tokens=skip_special_tokens)

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
        return _tokenizer_chat.apply_chat_template(
            self, messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=tokenize, template_kwargs=template_kwargs,
        )

    @no_type_check  # check_messages says how to fix a bad conversation
    def apply_chat_template_batch(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> EncodedBatch:
        """Several conversations rendered with the chat template and padded into one batch:
        prompts for [`eqzoo.generation.generate_batch`][].

        Each conversation is rendered as [`eqzoo.hf.HFTokenizer.apply_chat_template`][] renders
        it, then the texts are encoded as [`eqzoo.hf.HFTokenizer.encode_batch`][] encodes them,
        without adding special tokens (the template writes them): the ids and mask of
        transformers' `apply_chat_template(conversations, padding=..., return_dict=True)`.

        ```python
        batch = tokenizer.apply_chat_template_batch(conversations, add_generation_prompt=True, padding_side="left")
        out = generate_batch(model, batch.ids, attention_mask=batch.attention_mask, max_new_tokens=64)
        # row i of out: its prompt (batch.lengths[i] ids), the reply, then padding
        replies = tokenizer.decode_batch([row[n:] for row, n in zip(np.asarray(out), batch.lengths)], skip_special_tokens=True)
        ```

        **Arguments:** `conversations`, a list of conversations (each a list of messages);
        `add_generation_prompt` and `continue_final_message` as for `apply_chat_template`;
        `kwargs`, [`eqzoo.hf.HFTokenizer.encode_batch`][]'s padding and truncation arguments
        (`padding`, `max_length`, `truncation`, `truncation_side`, `padding_side`,
        `pad_to_multiple_of`, `pad_token_id`; its defaults and checks), and any other name a
        template variable, as for `apply_chat_template`.

        **Returns:** an [`eqzoo.data.EncodedBatch`][].
        """
        padding = {k: v for k, v in kwargs.items() if k in _PADDING_ARGUMENTS}
        template_kwargs = {k: v for k, v in kwargs.items() if k not in _PADDING_ARGUMENTS}
        return _tokenizer_chat.apply_chat_template_batch(
            self, conversations, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, padding=padding, template_kwargs=template_kwargs,
        )

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
        return _tokenizer_chat.encode_chat(self, messages, template_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "hf", "tokenizer_json": ..., "special_tokens": {...}, "chat_template": ...,
        "padding_side": ..., "truncation_side": ...}`, JSON-able."""
        return {
            "type": "hf", "tokenizer_json": self.tokenizer.to_str(), "special_tokens": dict(self._special),
            "chat_template": self.chat_template, "padding_side": self._padding_side,
            "truncation_side": self._truncation_side,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HFTokenizer":
        """Rebuild from the output of `to_dict()`."""
        if not isinstance(d, Mapping) or d.get("type") != "hf" or "tokenizer_json" not in d:
            raise TokenizerError("HFTokenizer.from_dict needs the output of HFTokenizer.to_dict() (type 'hf').")
        tokenizers = require("tokenizers", "hf")
        return cls(
            tokenizers.Tokenizer.from_str(d["tokenizer_json"]), d.get("special_tokens"), d.get("chat_template"),
            padding_side=d.get("padding_side", "right"), truncation_side=d.get("truncation_side", "right"),
        )

    def __copy__(self) -> "HFTokenizer":
        # A shallow copy shares the `tokenizers.Tokenizer`, and so the copy encode_batch keeps of it.
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __getstate__(self) -> dict[str, Any]:
        # What copy.deepcopy and pickle (multiprocessing workers) take: the batch copy holds a
        # lock, which cannot be copied; each copy makes its own for its own `tokenizers.Tokenizer`.
        state = {**self.__dict__, "tokenizer": copy.copy(self.tokenizer)}
        del state["_batch_encoder"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_truncation_side", "right")
        self.__dict__.update(state)
        self._batch_encoder = _batch.BatchEncoder()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.tokenizer.to_str())

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


# The names apply_chat_template_batch hands to encode_batch: its padding and truncation arguments.
_PADDING_ARGUMENTS = frozenset(inspect.signature(HFTokenizer.encode_batch).parameters) - {"self", "texts", "add_special_tokens"}


def load_tokenizer(path: str | os.PathLike[str]) -> HFTokenizer:
    """Load the Hugging Face fast tokenizer of a local checkpoint.

    **Arguments:** `path`, a checkpoint folder holding `tokenizer.json`, or that file itself.

    **Returns:** an [`eqzoo.hf.HFTokenizer`][].

    **Raises:** `HFFormatError` when there is no `tokenizer.json` (slow-tokenizer files such as
    `vocab.json` + `merges.txt` or `tokenizer.model` alone are not read: convert them once with
    `transformers.AutoTokenizer.from_pretrained(path).save_pretrained(path)`, which writes
    `tokenizer.json`), or when it cannot be parsed.
    """
    return HFTokenizer.from_file(find_tokenizer_file(path))
