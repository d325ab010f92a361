"""Decoding: KV-cache generation for one prompt or a batch, and token sampling.

`eqzoo.generate` is this package's `generate`, `eqzoo.generate_beam` its `generate_beam`.
"""

from ._beam import generate_beam as generate_beam
from ._builtin_processors import (
    BannedSequences as BannedSequences,
    MinLength as MinLength,
    MinNewTokens as MinNewTokens,
    NoRepeatNGram as NoRepeatNGram,
    SequenceBias as SequenceBias,
    SuppressTokens as SuppressTokens,
    SuppressTokensAtBegin as SuppressTokensAtBegin,
)
from ._decode_step import DecodeState as DecodeState
from ._engine import DecodeEngine as DecodeEngine
from ._generate import (
    UNROLL_DECODE_DEFAULTS as UNROLL_DECODE_DEFAULTS,
    generate as generate,
    generate_batch as generate_batch,
    resolve_unroll as resolve_unroll,
)
from ._prefix import Prefix as Prefix
from ._processors import BeforePenalty as BeforePenalty, LogitsProcessor as LogitsProcessor
from ._sampling import sample_logits as sample_logits
from ._serve import Request as Request, ServeEvent as ServeEvent, serve as serve
from ._speculative import generate_speculative as generate_speculative
from ._stream import StreamChunk as StreamChunk, generate_stream as generate_stream

__all__ = [
    "BannedSequences",
    "BeforePenalty",
    "DecodeEngine",
    "DecodeState",
    "LogitsProcessor",
    "MinLength",
    "MinNewTokens",
    "NoRepeatNGram",
    "Prefix",
    "Request",
    "SequenceBias",
    "ServeEvent",
    "SuppressTokens",
    "SuppressTokensAtBegin",
    "UNROLL_DECODE_DEFAULTS",
    "StreamChunk",
    "generate",
    "generate_batch",
    "generate_beam",
    "generate_speculative",
    "generate_stream",
    "resolve_unroll",
    "sample_logits",
    "serve",
]
