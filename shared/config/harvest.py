"""What `harvest run` does: which model, which text, which layers, how much."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csae.shared.config.base import ConfigError, check_distinct, check_finite


@dataclass(frozen=True)
class HarvestConfig:
    model: str = "gemma-3-270m"
    """Model: a registry name (gemma-3-270m, google/gemma-2-2b), a Hugging Face id, or a local directory."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub model; None means the default branch."""

    dataset: str = "wiki-vital"
    """Corpus: a registry name (wiki-vital, monology/pile-uncopyrighted) or a local .txt/.jsonl/.parquet file."""

    split: Literal["train", "heldout"] = "train"
    """Which part of the corpus: documents are assigned to train or heldout by a hash of their key."""

    heldout_doc_fraction: float = 0.1
    """Share of documents assigned to the heldout split (deterministic, by document)."""

    layers: tuple[int, ...] = ()
    """Blocks to store: layer L is the residual stream after block L (0-based, TransformerLens
    blocks.L.hook_resid_post). Empty: the model's preset layers."""

    tokens: int = 200_000
    """Token rows to store (BOS and padding excluded). Stops early, with a warning, if the corpus runs out."""

    context: int = 128
    """Sequence length including the BOS token; longer documents are cut into several sequences."""

    batch_size: int = 16
    """Sequences per forward pass."""

    sort_window: int = 32
    """Batches whose sequences are sorted by length together, to cut padding (1: no sorting)."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the model forward; auto: bfloat16 where the hardware has fast bfloat16 matmuls (GPUs,
    CPUs with AVX512-BF16/AMX), else float32. Activations are always stored as bfloat16."""

    device: str = "auto"
    """torch device for the forward: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""

    chunk_rows: int = 1024
    """Rows per Zarr chunk. Readers take whole chunks and shuffle in memory, so this is the read unit."""

    shard_chunks: int = 1
    """Chunks per file (Zarr v3 sharding); 1: one file per chunk. For stores of 10^8+ tokens, where one file
    per chunk means millions of files (see docs/scaling.md)."""

    def __post_init__(self) -> None:
        check_finite(self)
        if self.tokens <= 0:
            raise ConfigError(f"tokens must be positive, got {self.tokens}")
        if self.context < 2:
            raise ConfigError(f"context must be at least 2 (BOS plus one token), got {self.context}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.sort_window < 1:
            raise ConfigError(f"sort_window must be at least 1, got {self.sort_window}")
        if self.chunk_rows < 1 or self.shard_chunks < 1:
            raise ConfigError(f"chunk_rows and shard_chunks must be at least 1, got {self.chunk_rows} and "
                              f"{self.shard_chunks}")
        if not 0.0 < self.heldout_doc_fraction < 1.0:
            raise ConfigError(f"heldout_doc_fraction must be in (0, 1), got {self.heldout_doc_fraction}")
        if any(layer < 0 for layer in self.layers):
            raise ConfigError(f"layers must be non-negative block indices, got {list(self.layers)}")
        check_distinct("layers", self.layers)
        if list(self.layers) != sorted(self.layers):
            raise ConfigError(f"layers must be increasing, got {list(self.layers)}")
