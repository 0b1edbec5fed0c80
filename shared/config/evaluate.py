"""What `evaluate run` measures, on how much held-out data, and how its intervals are formed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from csae.shared.config.base import ConfigError, check_finite


@dataclass(frozen=True)
class EvalConfig:
    recon_tokens: int = 32_768
    """Store rows used for reconstruction, sparsity, contrastive and topic metrics: the first rows of the
    held-out tail of the store (rows training never reads). 0: the whole tail."""

    sae_batch_size: int = 4096
    """Rows per SAE forward when computing store-based metrics."""

    ce_tokens: int = 512
    """Next-token predictions (held-out corpus text) for the downstream CE and KL scores. 0: skip them."""

    ce_doc_predictions: int = 32
    """Downstream CE/KL: at most this many predictions from one document (its first tokens), so that the
    predictions come from many documents, the unit the intervals resample. 0: whole documents."""

    lm_batch_size: int = 8
    """Sequences per language-model forward."""

    logit_chunk: int = 512
    """Token positions whose next-token statistics are computed together (each chunk walks the vocabulary in
    blocks of about 1M logits, so memory stays small whatever the chunk)."""

    contrastive_batch: int = 128
    """Anchor/positive pairs per held-out InfoNCE batch, each pair from a different sequence, so every
    negative comes from another sequence than its anchor (fewer when the rows hold fewer sequences)."""

    contrastive_batches: int = 32
    """Held-out InfoNCE batches (each a fresh draw of sequences and pairs)."""

    head_rows: int = 16_384
    """Fresh contrastive head: training rows (whole random chunks of the store's training part) whose frozen
    SAE features it is fitted on."""

    head_steps: int = 300
    """Fresh contrastive head: optimiser steps (Adam), the same for every run, seed and layer."""

    head_lr: float = 1e-3
    """Fresh contrastive head: Adam learning rate."""

    temperature: float | None = None
    """InfoNCE temperature; None: the one in the checkpoint's training config."""

    coact_features: int = 1024
    """Live features (random sample when there are more) whose pairwise activation correlation is measured."""

    dense_thresholds: tuple[float, ...] = (0.01, 0.1)
    """Firing-density thresholds: report the share of features that fire on more than each fraction of tokens."""

    topic_min_fires: int = 10
    """A feature enters the topic statistics only if it fires on at least this many evaluated tokens."""

    topic_permutations: int = 1000
    """Permutations of the documents' topic labels that form each feature's null distribution."""

    topic_fdr: float = 0.05
    """False discovery rate (Benjamini-Hochberg) at which a feature counts as more topic-specific than chance."""

    forget_topic: str = "Biology and health sciences"
    """Unlearning: the corpus topic whose held-out documents are the forget text."""

    retain_topics: tuple[str, ...] = ("History", "Geography", "Arts", "Mathematics")
    """Unlearning: corpus topics whose held-out documents are the retain text (documents taken in turn)."""

    select_tokens: int = 4096
    """Unlearning: tokens of forget and of retain selection text (each) whose firing rates select features.
    Only the residual at the layer is needed, so these are cheap."""

    sweep_predictions: int = 128
    """Unlearning: predictions of forget and of retain selection text (each) on which the sweep chooses
    (tau, n, c). Top-1 accuracy only, through the exact shortcut (no LM head where its bound decides).
    The sweep only chooses; the test split reports. With few known retain tokens (~55 at 128) the rule
    A_retain >= retain_accuracy can allow no lost token, and an SAE may then find no setting."""

    unlearn_known: int = 1000
    """Unlearning: known tokens (the clean model's top-1 prediction is right) of forget and of retain text
    (each) in the test split, documents disjoint from the selection split, on which U and U_CE are
    reported. 0: skip unlearning."""

    retain_thresholds: tuple[float, ...] = (0.001, 0.01)
    """Unlearning sweep: retain firing-rate thresholds tau (features firing on at least this share of retain
    selection tokens are never chosen)."""

    ns: tuple[int, ...] = (10, 20, 50)
    """Unlearning sweep: numbers of features n clamped."""

    cs: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)
    """Unlearning sweep: clamp multipliers c (selected features that fire are set to -c times their mean
    activation on forget selection text)."""

    retain_accuracy: float = 0.99
    """Unlearning: the retain constraint, A_retain >= this (share of known retain tokens still right)."""

    unlearn_points: Literal["main", "all"] = "main"
    """Unlearning: at the sparsity points trained at every layer (main; the family costs the most per SAE) or
    at every point of a sweep (all). The other families run at every point."""

    unlearn_layers: tuple[int, ...] = ()
    """Unlearning: the layers it runs at (empty: every layer). The family costs the most per SAE; the default
    pipeline runs it at the middle layer, for its time budget."""

    random_draws: int = 2
    """Unlearning control: draws of n random features matched on forget firing rate, each clamped like the
    chosen setting on the test split (their mean is U_random, their spread U_random_sd). 0: no control."""

    probe_docs: int = 1000
    """Sparse probing and TPP: store documents with a topic (when there are more, drawn as evenly over topics as
    they allow, a small topic keeping all of its; the same for every SAE) whose mean codes over their positions
    are probed, training and held-out rows alike (as SAEBench). 0: skip both families."""

    probe_test_fraction: float = 0.2
    """Sparse probing: share of each topic's probed documents on the test side (SAEBench: 80/20)."""

    probe_ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    """Sparse probing: numbers k of features (or residual channels) chosen per topic and probed."""

    probe_min_test_docs: int = 10
    """Sparse probing: a topic with fewer positive test documents is left out of the averages (counted in
    probe_thin_topics, its document counts still reported)."""

    tpp_ns: tuple[int, ...] = (2, 5, 10, 20)
    """TPP: numbers N of latents zero-ablated per topic (those with the largest effect on its probe)."""

    pairs: tuple[str, ...] = ()
    """Runs compared at matched L0, each "A:B" (A minus B, run names as their checkpoint directories are
    named), in the order reported. Empty: every run minus the reference (the last run given), then every pair
    of the other runs in the order given (runs csae tsae baseline: csae:baseline, tsae:baseline, csae:tsae)."""

    bootstrap_resamples: int = 1000
    """Bootstrap replicates behind every interval and paired comparison."""

    confidence: float = 0.95
    """Confidence level of the intervals (percentile bootstrap)."""

    model: str | None = None
    """Language model for downstream metrics; None: the model recorded in the store."""

    dataset: str | None = None
    """Corpus for downstream metrics (its heldout split); None: the corpus recorded in the store."""

    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the language model; auto: float32 unless the hardware has fast bfloat16 matmuls."""

    device: str = "auto"
    """torch device: auto (cuda if available, else cpu), cpu, cuda, ..."""

    seed: int = 0
    """Seed of everything evaluate draws: pairs, fresh-head initialisation and batches, sampled features,
    permutations, the random control and the bootstrap."""

    def __post_init__(self) -> None:
        check_finite(self)
        nonneg = ("recon_tokens", "ce_tokens", "ce_doc_predictions", "select_tokens", "sweep_predictions",
                  "unlearn_known", "topic_min_fires", "random_draws", "head_steps")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        positive = ("sae_batch_size", "lm_batch_size", "logit_chunk", "coact_features", "contrastive_batches",
                    "head_rows", "topic_permutations", "bootstrap_resamples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.contrastive_batch < 2:
            raise ConfigError(f"contrastive_batch must be at least 2 (one negative), got {self.contrastive_batch}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.head_lr <= 0:
            raise ConfigError(f"head_lr must be positive, got {self.head_lr}")
        if any(not 0.0 < t < 1.0 for t in self.dense_thresholds):
            raise ConfigError(f"dense_thresholds must be in (0, 1), got {list(self.dense_thresholds)}")
        for name in ("topic_fdr", "confidence"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for pair in self.pairs:
            a, sep, b = pair.partition(":")
            if not sep or not a or not b or a == b or ":" in b:
                raise ConfigError(f"pairs: {pair!r} is not A:B with two different run names (e.g. tsae:baseline)")
        self._check_probing()
        self._check_unlearning()

    def _check_probing(self) -> None:
        if self.probe_docs < 0:
            raise ConfigError(f"probe_docs must be non-negative (0 skips sparse probing), got {self.probe_docs}")
        if not self.probe_docs:
            return
        if not 0.0 < self.probe_test_fraction < 1.0:
            raise ConfigError(f"probe_test_fraction must be in (0, 1), got {self.probe_test_fraction}")
        if not self.probe_ks or any(k < 1 for k in self.probe_ks):
            raise ConfigError(f"probe_ks needs positive values (or --probe-docs 0), got {list(self.probe_ks)}")
        if any(n < 1 for n in self.tpp_ns):
            raise ConfigError(f"tpp_ns must be positive, got {list(self.tpp_ns)}")
        if self.probe_min_test_docs < 1:
            raise ConfigError(f"probe_min_test_docs must be at least 1, got {self.probe_min_test_docs}")

    def _check_unlearning(self) -> None:
        if not self.unlearn_known:
            return
        if not (self.retain_thresholds and self.ns and self.cs):
            raise ConfigError("retain_thresholds, ns and cs need at least one value each (or --unlearn-known 0 to "
                              "skip unlearning)")
        if not self.select_tokens or not self.sweep_predictions:
            raise ConfigError("select_tokens and sweep_predictions must be positive (or --unlearn-known 0 to skip "
                              "unlearning)")
        if any(not 0.0 < t <= 1.0 for t in self.retain_thresholds):
            raise ConfigError(f"retain_thresholds must be in (0, 1], got {list(self.retain_thresholds)}")
        if any(n < 1 for n in self.ns):
            raise ConfigError(f"ns must be positive, got {list(self.ns)}")
        if any(c <= 0 for c in self.cs):
            raise ConfigError(f"cs must be positive, got {list(self.cs)}")
        if not 0.0 < self.retain_accuracy <= 1.0:
            raise ConfigError(f"retain_accuracy must be in (0, 1], got {self.retain_accuracy}")
        if self.forget_topic in self.retain_topics:
            raise ConfigError(f"the forget topic {self.forget_topic!r} cannot also be a retain topic")
        if not self.retain_topics:
            raise ConfigError("retain_topics needs at least one topic (or --unlearn-known 0 to skip unlearning)")
