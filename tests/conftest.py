"""Every shared fixture: a tiny random-weight Gemma-2 (26 blocks) and a small jsonl corpus (harvest, train, the
pipeline); a tiny Gemma 3 and a topic corpus (evaluate; built by tiny_eval.py); a browser site with a planted
feature (planted_site.py); the reference store of the fault tests (faults.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from planted_site import build_planted_site
from tiny_eval import make_tiny_gemma3, make_topic_corpus

from csae.shared.lm.testing import make_tiny_gemma2

# Tests run tiny models whose ops are far too small to split across threads: with 2 OpenMP threads a
# tiny forward measured 50x slower than with 1 whenever another process used the CPU. Subprocesses
# started by tests inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

TOPICS = ("Biology and health sciences", "History", "Geography", "Arts")

#: Both compute dtypes, on every machine: where the CPU lacks fast bfloat16, torch emulates it (slower,
#: same results), so the bfloat16 path that `dtype=auto` picks on AVX512-BF16/AMX CPUs and GPUs is tested
#: everywhere, and the float32 path that it picks elsewhere is tested on fast-bfloat16 machines too.
DTYPES = ("float32", "bfloat16")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The bfloat16 run of a dtype-dependent test is `slow`: the fast tier covers each such test in float32
    (where bfloat16 is emulated it costs several times float32's run), the full suite runs both."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("dtype") == "bfloat16":
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> str:
    """The compute dtype forced on a test that depends on it (it runs once per dtype)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a random-weight Gemma-2 with 26 blocks (d_model 64) and a byte-level tokenizer."""
    return make_tiny_gemma2(tmp_path_factory.mktemp("tiny-gemma2"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl corpus of 120 short documents (about 3.5k tokens) with titles and 4 topics."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    words = "cells rivers empires numbers paintings proteins mountains kings seas stars".split()
    with open(path, "w") as fh:
        for i in range(120):
            text = " ".join(words[(i * 7 + k) % len(words)] for k in range(5 + i % 12))
            fh.write(json.dumps({"text": text, "title": f"doc {i}", "topic": TOPICS[i % len(TOPICS)]}) + "\n")
    return path


@pytest.fixture(scope="module")
def src(tiny_gemma2: Path, tiny_corpus: Path) -> list[str]:
    """`--model ... --dataset ...` of the tiny model and corpus, for commands run in a subprocess."""
    return ["--model", str(tiny_gemma2), "--dataset", str(tiny_corpus)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, src: list[str]) -> Path:
    """The store one uninterrupted `harvest run` writes with faults.HARVEST (to compare faulty runs with)."""
    from faults import HARVEST, run

    path = tmp_path_factory.mktemp("ref") / "acts.zarr"
    proc = run("harvest", ["run", *src, *HARVEST, "--store", path])
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Gemma 3 that mostly predicts "the next token repeats the current one" (tiny_eval.py)."""
    return make_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def topic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A jsonl corpus of 4 topics with disjoint vocabularies (tiny_eval.py)."""
    return make_topic_corpus(tmp_path_factory.mktemp("topic-corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def planted_site(tmp_path_factory: pytest.TempPathFactory, tiny_gemma3: Path, topic_corpus: Path,
                 dtype: str) -> dict[str, Any]:
    """`evaluate browse` of a csae run with a planted feature and a baseline run (planted_site.py)."""
    return build_planted_site(tmp_path_factory.mktemp("browse"), tiny_gemma3, topic_corpus, dtype)


@pytest.fixture(scope="module")
def reference_sae(tmp_path_factory: pytest.TempPathFactory, reference: Path) -> Path:
    """The layer directory an uninterrupted `train fit` on the reference store writes (the fault tests')."""
    from faults import TRAIN, run

    out = tmp_path_factory.mktemp("ref-ck") / "ck"
    proc = run("train", ["fit", "--store", reference, "--out", out, *TRAIN])
    assert proc.returncode == 0, proc.stderr
    return out / "seed_0" / "layer_12"
