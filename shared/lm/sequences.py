"""The rule that cuts documents into token sequences, shared by harvest (which stores them) and evaluate
(which cuts held-out text the same way): BOS + up to context-1 tokens, one document per sequence, so no
token attends across a document boundary. Deterministic: harvest's resume depends on it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from csae.shared.lm.corpora import Document

_TOKENIZE_DOCS = 256  # documents per tokenizer call: the fast tokenizer is much quicker on lists


@dataclass
class DocTable:
    """The documents that contributed sequences, in order of first use (their store-local index)."""

    source_index: list[int] = field(default_factory=list)
    topic: list[str] = field(default_factory=list)
    title: list[str] = field(default_factory=list)

    def add(self, doc: Document) -> int:
        self.source_index.append(doc.index)
        self.topic.append(doc.topic)
        self.title.append(doc.title)
        return len(self.source_index) - 1


@dataclass(frozen=True)
class Seq:
    index: int
    doc: int
    """Store-local document index."""
    ids: list[int]
    """Token ids including the leading BOS (when the tokenizer has one)."""
    first_stored: int
    """1 when ids[0] is BOS: its norm is orders of magnitude above the rest, so it is never stored."""


def body_length(tokenizer: Any, context: int) -> int:
    """Document tokens per sequence (the BOS, when the tokenizer has one, takes a position)."""
    return context - 1 if tokenizer.bos_token_id is not None else context


def piece_lengths(n_tokens: int, body: int) -> list[int]:
    """Token counts of the sequences a document of `n_tokens` tokens is cut into (as `iter_sequences` cuts)."""
    return [min(body, n_tokens - start) for start in range(0, n_tokens, body)]


def token_counts(docs: list[Document], tokenizer: Any) -> list[int]:
    """Tokens of each document, tokenized as `iter_sequences` does."""
    return [len(ids) for i in range(0, len(docs), _TOKENIZE_DOCS) for ids in
            tokenizer([d.text for d in docs[i:i + _TOKENIZE_DOCS]], add_special_tokens=False)["input_ids"]]


def iter_sequences(docs: Iterable[Document], tokenizer: Any, context: int, table: DocTable,
                   first_index: int = 0) -> Iterator[Seq]:
    """Cut each document into sequences of BOS + up to context-1 tokens; one document per sequence, so
    no token attends across a document boundary. `first_index` (and a `table` already holding the documents
    before) continue a stream that starts at a later document."""
    bos = tokenizer.bos_token_id
    body = body_length(tokenizer, context)
    seq_index = first_index
    doc_iter = iter(docs)
    while batch := list(islice(doc_iter, _TOKENIZE_DOCS)):
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(batch, encoded, strict=True):
            if not ids:
                continue
            local = table.add(doc)
            for start in range(0, len(ids), body):
                piece = ids[start:start + body]
                yield Seq(index=seq_index, doc=local, ids=([bos] if bos is not None else []) + piece,
                          first_stored=int(bos is not None))
                seq_index += 1
