"""What `evaluate run` measures and on how many held-out tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csae.shared.config.base import ConfigError


@dataclass(frozen=True)
class EvalConfig:
    recon_tokens: int = 16_384
    """Store rows used for reconstruction, sparsity, contrastive and topic metrics: the first rows of the
    held-out tail of the store (rows training never reads). 0: the whole tail."""

    sae_batch_size: int = 4096
    """Rows per SAE forward when computing store-based metrics."""

    ce_tokens: int = 1024
    """Next-token predictions (held-out corpus text) for the downstream CE and KL scores. 0: skip the
    downstream and unlearning metrics (no language model is loaded)."""

    lm_batch_size: int = 8
    """Sequences per language-model forward."""

    logit_chunk: int = 512
    """Token positions per log-softmax chunk over the vocabulary (bounds memory: chunk x vocab floats)."""

    contrastive_batch: int = 256
    """Anchor/positive pairs per in-batch InfoNCE on held-out rows (negatives: the other pairs' positives)."""

    temperature: float | None = None
    """InfoNCE temperature; None: the one in the checkpoint's training config, else 0.1."""

    coact_features: int = 1024
    """Live features (random sample when there are more) whose pairwise activation correlation is measured."""

    dense_thresholds: tuple[float, ...] = (0.01, 0.1)
    """Firing-density thresholds: report the share of features that fire on more than each fraction of tokens."""

    topic_min_fires: int = 10
    """A feature enters the topic-purity statistics only if it fires on at least this many evaluated tokens."""

    topic_specific_ratio: float = 0.5
    """A feature is topic-specific when the entropy of its topic distribution is below this share of the
    entropy of the evaluated tokens' topic distribution."""

    forget_topic: str = "Biology and health sciences"
    """Unlearning: the corpus topic whose held-out documents are the forget text."""

    retain_topics: tuple[str, ...] = ("History", "Geography", "Arts", "Mathematics")
    """Unlearning: corpus topics whose held-out documents are the retain text (documents taken in turn)."""

    select_tokens: int = 4096
    """Unlearning: tokens of forget and of retain text (each) used to select features (firing rates, mean
    activations). Only the residual at the layer is needed, so these are cheap."""

    unlearn_tokens: int = 128
    """Unlearning: next-token predictions of forget and of retain text (each) the sweep is evaluated on.
    Every sweep point needs a forward from the layer on plus the 262k-way LM head (~4 ms per prediction on
    2 CPU cores), so this sets the unlearning cost: 60 points x 256 predictions ~ 1 minute per run and
    layer. 0: skip unlearning."""

    retain_thresholds: tuple[float, ...] = (0.001, 0.01)
    """Unlearning sweep: retain firing-rate thresholds (features firing on at least this share of retain tokens
    are never chosen)."""

    ns: tuple[int, ...] = (10, 20, 50)
    """Unlearning sweep: numbers of features n clamped."""

    cs: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0)
    """Unlearning sweep: clamp multipliers c (selected features that fire are set to -c times their mean
    activation on forget-selection text)."""

    retain_accuracy: float = 0.99
    """Unlearning score U: only sweep points keeping at least this share of known retain tokens count."""

    retain_ce_tolerance: float = 0.01
    """U_CE: only sweep points whose retain CE rises by at most this share of (CE_zero - CE_clean) count."""

    random_control: bool = True
    """Also run the sweep with n random features (below the retain threshold) and report U - U_random."""

    model: str | None = None
    """Language model for downstream metrics; None: the model recorded in the store."""

    dataset: str | None = None
    """Corpus for downstream metrics (its heldout split); None: the corpus recorded in the store."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the language model; auto: float32 unless the hardware has fast bfloat16 matmuls."""

    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, ..."""

    seed: int = 0
    """Seed for sampled pairs, sampled features and the random-feature control."""

    def __post_init__(self) -> None:
        for name in ("recon_tokens", "ce_tokens", "select_tokens", "unlearn_tokens", "topic_min_fires"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("sae_batch_size", "lm_batch_size", "logit_chunk", "coact_features"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.contrastive_batch < 2:
            raise ConfigError(f"contrastive_batch must be at least 2 (one negative), got {self.contrastive_batch}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if any(not 0.0 < t < 1.0 for t in self.dense_thresholds):
            raise ConfigError(f"dense_thresholds must be in (0, 1), got {list(self.dense_thresholds)}")
        if not 0.0 < self.topic_specific_ratio <= 1.0:
            raise ConfigError(f"topic_specific_ratio must be in (0, 1], got {self.topic_specific_ratio}")
        if self.unlearn_tokens and not (self.retain_thresholds and self.ns and self.cs):
            raise ConfigError("retain_thresholds, ns and cs need at least one value each (or --unlearn-tokens 0 to "
                              "skip)")
        if any(not 0.0 < t <= 1.0 for t in self.retain_thresholds):
            raise ConfigError(f"retain_thresholds must be in (0, 1], got {list(self.retain_thresholds)}")
        if any(n < 1 for n in self.ns):
            raise ConfigError(f"ns must be positive, got {list(self.ns)}")
        if any(c <= 0 for c in self.cs):
            raise ConfigError(f"cs must be positive, got {list(self.cs)}")
        if not 0.0 < self.retain_accuracy <= 1.0:
            raise ConfigError(f"retain_accuracy must be in (0, 1], got {self.retain_accuracy}")
        if self.retain_ce_tolerance < 0:
            raise ConfigError(f"retain_ce_tolerance must be non-negative, got {self.retain_ce_tolerance}")
        if self.forget_topic in self.retain_topics:
            raise ConfigError(f"the forget topic {self.forget_topic!r} cannot also be a retain topic")
        if self.unlearn_tokens and not self.retain_topics:
            raise ConfigError("retain_topics needs at least one topic (or --unlearn-tokens 0 to skip)")
