"""`HFTokenizer`'s chat path: picking the chat template, rendering conversations with it into
text or token ids (one or a padded batch), and the assistant-token mask for fine-tuning.

The rendering itself (Jinja's sandbox, the assistant spans) is `_chat`'s; this module ties it
to a tokenizer."""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data import EncodedBatch, TokenizerError
from ._chat import assistant_spans, check_messages, render


def select_template(template: str | Mapping[str, str] | None, who: str, tools: Any = None) -> str:
    """The template `HFTokenizer.{who}` renders with: the one template, or among named ones
    `"tool_use"` when `tools` are given and it exists, else `"default"`."""
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


def apply_chat_template(
    hf: Any, messages: Any, *, add_generation_prompt: Any, continue_final_message: Any, tokenize: Any,
    template_kwargs: dict[str, Any],
) -> Any:
    """`HFTokenizer.apply_chat_template`, for the tokenizer `hf`."""
    messages = check_messages(messages)
    if add_generation_prompt and continue_final_message:
        raise TokenizerError(
            "apply_chat_template: add_generation_prompt starts a new assistant turn and "
            "continue_final_message continues the last one; ask for one of them."
        )
    template = select_template(hf.chat_template, "apply_chat_template", template_kwargs.get("tools"))
    text = render(
        template, messages, hf._special_strings(), add_generation_prompt=bool(add_generation_prompt), **template_kwargs,
    )
    if continue_final_message:
        content = messages[-1].get("content")
        if not isinstance(content, str) or not content.strip() or content.strip() not in text:
            raise TokenizerError(
                "apply_chat_template(continue_final_message=True) needs the last message's text "
                "content as the template renders it; it was not found in the rendered text."
            )
        text = text[: text.rindex(content.strip()) + len(content.strip())]
    return hf.encode(text, add_special_tokens=False) if tokenize else text


def apply_chat_template_batch(
    hf: Any, conversations: Any, *, add_generation_prompt: Any, continue_final_message: Any,
    padding: dict[str, Any], template_kwargs: dict[str, Any],
) -> EncodedBatch:
    """`HFTokenizer.apply_chat_template_batch`, for the tokenizer `hf`, with its keyword
    arguments already split into `encode_batch`'s (`padding`) and the template's."""
    if isinstance(conversations, str | bytes | Mapping) or not isinstance(conversations, Sequence) or not conversations:
        raise TokenizerError(
            "apply_chat_template_batch takes a non-empty list of conversations, each a list of messages; "
            f"got {type(conversations).__name__}. For one conversation use apply_chat_template."
        )
    if any(isinstance(c, Mapping) for c in conversations):
        raise TokenizerError(
            "apply_chat_template_batch takes a list of conversations, and got a list of messages: one "
            "conversation. Wrap it, [messages], or use apply_chat_template(messages)."
        )
    texts = [
        hf.apply_chat_template(
            c, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=False, **template_kwargs,
        )
        for c in conversations
    ]
    return hf.encode_batch(texts, add_special_tokens=False, **padding)


def encode_chat(hf: Any, messages: Any, template_kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """`HFTokenizer.encode_chat`, for the tokenizer `hf`."""
    for name in ("add_generation_prompt", "continue_final_message"):
        if name in template_kwargs:
            raise TokenizerError(
                f"encode_chat renders whole conversations for training; {name} is for "
                "apply_chat_template (generation)."
            )
    template = select_template(hf.chat_template, "encode_chat", template_kwargs.get("tools"))
    text, spans = assistant_spans(template, check_messages(messages), hf._special_strings(), **template_kwargs)
    encoding = hf.tokenizer.encode(text, add_special_tokens=False)
    tokens = np.asarray(encoding.ids, dtype=np.int32)
    mask = np.zeros(tokens.shape, dtype=bool)
    if spans and tokens.size:
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        for start, end in spans:
            mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return tokens, mask
