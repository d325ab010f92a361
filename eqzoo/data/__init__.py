"""Deterministic, resumable, host-sharded data loading; document packing; text sources;
tokenizers."""

from ._corpus import (
    CorpusError as CorpusError,
    split_tokens as split_tokens,
    stdlib_corpus as stdlib_corpus,
)
from ._encoding import EncodedBatch as EncodedBatch
from ._loader import ArrayLoader as ArrayLoader, TokenLoader as TokenLoader
from ._pack import pack_documents as pack_documents
from ._stream_decoder import StreamDecoder as StreamDecoder
from ._tokenizer import (
    AbstractTokenizer as AbstractTokenizer,
    ByteTokenizer as ByteTokenizer,
    CharTokenizer as CharTokenizer,
    TokenizerError as TokenizerError,
    tokenizer_from_dict as tokenizer_from_dict,
)

__all__ = [
    "AbstractTokenizer",
    "ArrayLoader",
    "ByteTokenizer",
    "CharTokenizer",
    "CorpusError",
    "EncodedBatch",
    "StreamDecoder",
    "TokenLoader",
    "TokenizerError",
    "pack_documents",
    "split_tokens",
    "stdlib_corpus",
    "tokenizer_from_dict",
]
