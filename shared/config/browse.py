"""What `evaluate browse` collects for the static feature browser, from how many rows, and how it computes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csae.shared.config.base import ConfigError, check_finite


@dataclass(frozen=True)
class BrowseConfig:
    rows: int = 16_384
    """Store rows each SAE's encoder reads once: the held-out tail first, then training rows from the start
    of the store, in whole sequences. 0: every row. Bounds the build time; RAM does not grow with it beyond
    16 bytes per row (token id, sequence, document of each row read)."""

    seed: int = 0
    """The training seed whose SAEs are shown (checkpoints/<run>/seed_<seed>/)."""

    top_contexts: int = 20
    """Contexts per feature where it fires hardest (its top activations, each on a different token)."""

    sample_contexts: int = 5
    """Contexts per feature drawn uniformly at random from all tokens it fires on (so mostly from its lower
    activation quantiles), shown under the top ones."""

    window: int = 10
    """Tokens shown on each side of a context's token (within its sequence)."""

    logit_tokens: int = 10
    """Tokens listed whose logits the feature's decoder direction raises most, and as many it lowers most."""

    logit_vocabulary: Literal["store", "all"] = "store"
    """Tokens ranked by logit effect: store = the token ids that occur in the rows read (about a tenth of Gemma's
    262k, ten times faster); all = the whole vocabulary."""

    neighbours: int = 5
    """Nearest features by decoder cosine listed per feature (same dictionary)."""

    histogram_bins: int = 40
    """Bins of each feature's activation histogram (log-spaced, the same edges for every feature of a
    dictionary)."""

    batch_size: int = 4096
    """Rows per encoder forward (RAM: about batch_size x d_sae x 12 bytes)."""

    model: str | None = None
    """Language model whose tokenizer, final norm and unembedding are used; None: the store's model."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the encoder and unembedding products; auto: float32 unless the hardware has fast bfloat16
    matmuls."""

    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, ..."""

    def __post_init__(self) -> None:
        check_finite(self)
        for name in ("rows", "seed", "sample_contexts", "window", "neighbours"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("top_contexts", "logit_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.histogram_bins < 2:
            raise ConfigError(f"histogram_bins must be at least 2, got {self.histogram_bins}")
