"""Metrics computed from the store's held-out tail: reconstruction, sparsity, contrastive, decoder
geometry, co-activation and topic purity of one trained layer."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from csae.evaluate.checkpoints import LayerCheckpoint
from csae.evaluate.contrastive import context_pairs, info_nce, mean_over_batches
from csae.evaluate.features import FeatureStats, decoder_geometry, topic_purity
from csae.evaluate.reconstruction import reconstruction_metrics
from csae.shared.config.evaluate import EvalConfig
from csae.shared.errors import UserError
from csae.shared.schema import ActivationStore


def heldout_rows(store: ActivationStore, ckpt: LayerCheckpoint, limit: int) -> tuple[int, int]:
    """[start, stop): the first `limit` rows (0: all) of the tail the checkpoint's training never read."""
    fraction = ckpt.info.config.heldout_tail_fraction
    start = store.heldout_start(fraction)
    if start >= store.n_rows:
        raise UserError(f"{ckpt.path} was trained with heldout_tail_fraction={fraction}, which leaves no held-out rows "
                        f"in a store of {store.n_rows} rows ({store.chunk_rows} per chunk); re-train with a larger "
                        f"heldout_tail_fraction or harvest more tokens")
    return start, store.n_rows if limit == 0 else min(store.n_rows, start + limit)


@functools.lru_cache(maxsize=4)
def _read(store: ActivationStore, layer: int, start: int, stop: int) -> torch.Tensor:
    return store.read(layer, start, stop).float()


def _row_topics(store: ActivationStore, start: int, stop: int) -> torch.Tensor | None:
    if not store.topics or "docs/topic" not in store.group:
        return None
    doc_topic = store.docs("topic").astype(np.int64)
    return torch.from_numpy(doc_topic[store.tokens("doc")[start:stop]])


@torch.inference_mode()
def store_metrics(store: ActivationStore, ckpt: LayerCheckpoint, cfg: EvalConfig) -> tuple[dict[str, Any], np.ndarray]:
    """(metrics, per-feature firing density) of one checkpoint on its held-out store rows."""
    start, stop = heldout_rows(store, ckpt, cfg.recon_tokens)
    x_ND = _read(store, ckpt.layer, start, stop)
    topics_N = _row_topics(store, start, stop)
    sae, bs = ckpt.sae, cfg.sae_batch_size
    stats = FeatureStats(sae.d_sae, len(store.topics))
    x_hat = torch.empty_like(x_ND)
    for s in range(0, len(x_ND), bs):
        x_hat[s:s + bs], f = sae(x_ND[s:s + bs])
        stats.update(f, None if topics_N is None else topics_N[s:s + bs])
    metrics: dict[str, Any] = {"eval_rows": len(x_ND), **reconstruction_metrics(x_ND, x_hat)}
    metrics.update(stats.sparsity(cfg.dense_thresholds))

    # Co-activation: a second pass over a sample of the features that fired at least once.
    gen = torch.Generator().manual_seed(cfg.seed)
    live = torch.nonzero(stats.fires_F > 0).squeeze(1)
    sample = live[torch.randperm(len(live), generator=gen)[: cfg.coact_features]].sort().values
    coact = FeatureStats(sae.d_sae, 0, sample_F=sample)
    for s in range(0, len(x_ND), bs):
        coact.update(sae.encode(x_ND[s:s + bs]))
    metrics["coactivation_mean_abs_corr"] = coact.coactivation()
    metrics.update(decoder_geometry(sae.W_dec.detach()))
    if topics_N is not None:
        metrics.update(topic_purity(stats.topic_fires_FT, stats.topic_tokens_T, cfg.topic_min_fires,
                                    cfg.topic_specific_ratio))
    if ckpt.head is not None:
        metrics.update(contrastive_metrics(store, ckpt, x_ND, start, stop, cfg))
    return metrics, stats.density_F().numpy()


def contrastive_metrics(store: ActivationStore, ckpt: LayerCheckpoint, x_ND: torch.Tensor, start: int, stop: int,
                        cfg: EvalConfig) -> dict[str, float]:
    """Held-out InfoNCE of the head over full batches of context pairs of the evaluated rows."""
    temperature = cfg.temperature or ckpt.info.config.temperature
    rng = np.random.default_rng(cfg.seed)
    anchors, positives = context_pairs(store.tokens("seq")[start:stop], rng)
    b = cfg.contrastive_batch
    results = []
    for s in range(0, len(anchors) - b + 1, b):
        a_idx, p_idx = torch.from_numpy(anchors[s:s + b]), torch.from_numpy(positives[s:s + b])
        z_a = ckpt.head(ckpt.sae.encode(x_ND[a_idx]))
        z_p = ckpt.head(ckpt.sae.encode(x_ND[p_idx]))
        results.append(info_nce(z_a, z_p, temperature))
    out = {f"heldout_{k}": v for k, v in mean_over_batches(results).items()}
    out["heldout_infonce_chance"] = float(np.log(b))
    out["contrastive_pairs"] = len(results) * b
    return out
