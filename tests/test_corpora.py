"""Corpus registry: local files, the embedded corpus, and the split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from csae.shared.errors import UserError
from csae.shared.lm.corpora import iter_documents, wiki_vital_path


def test_txt_is_one_document_per_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    paragraphs = [f"Paragraph {i} line one.\nParagraph {i} line two." for i in range(40)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    docs = list(iter_documents(str(path), "train", 0.25)) + list(iter_documents(str(path), "heldout", 0.25))
    assert sorted(d.text.strip() for d in docs) == sorted(paragraphs)


def test_parquet_and_jsonl_keep_title_and_topic(tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "title": f"t{i}", "topic": "History" if i % 2 else "Arts"} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("c.parquet", "c.jsonl"):
        docs = [d for split in ("train", "heldout") for d in iter_documents(str(tmp_path / name), split, 0.3)]
        assert sorted((d.title, d.topic, d.text) for d in docs) == sorted((r["title"], r["topic"], r["text"])
                                                                          for r in rows)


def test_missing_local_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope.jsonl"), "train", 0.1))


def test_wiki_vital_split_is_disjoint_deterministic_and_about_ten_percent() -> None:
    articles = json.loads(wiki_vital_path().read_text())
    train = [d.title for d in iter_documents("wiki-vital", "train", 0.1)]
    held = [d.title for d in iter_documents("wiki-vital", "heldout", 0.1)]
    assert len(articles) == 10_033 and not set(train) & set(held) and len(train) + len(held) == 10_033
    assert 0.08 < len(held) / 10_033 < 0.12
    assert held == [d.title for d in iter_documents("wiki-vital", "heldout", 0.1)]
    topics = {d.topic for d in iter_documents("wiki-vital", "heldout", 0.1)}
    assert len(topics) == 12 and "Biology and health sciences" in topics
