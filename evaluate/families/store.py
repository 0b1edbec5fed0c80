"""The families computed from the store's held-out tail (reconstruction/sparsity, contrastive with decoder
geometry and co-activation, topic, smoothness along sequences), composed per layer: all checkpoints of a layer
share its held-out rows, so their figures are resampled over the same documents. SAEs with a high-level block
(T-SAE) come first in a layer, so the others can be matched to their block on firing rate (temporal.py)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from csae.evaluate.families.contrastive import contrastive_figures
from csae.evaluate.families.disentanglement import disentanglement_figures
from csae.evaluate.families.heldout import heldout_range, heldout_rows, sae_pass, training_sample
from csae.evaluate.families.reconstruction import reconstruction_figures
from csae.evaluate.families.temporal import LagSums, block_features, rate_gap, smoothness_figures
from csae.evaluate.families.topic import topic_figures
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.stats import FamilyResult, Units, seed_of
from csae.shared.config.evaluate import EvalConfig
from csae.shared.errors import UserError
from csae.shared.store.schema import ActivationStore


def store_families(store: ActivationStore, ckpts: list[LayerCheckpoint], cfg: EvalConfig,
                   progress: bool) -> tuple[list[FamilyResult], dict[str, np.ndarray]]:
    """(one FamilyResult per layer, per-feature firing density of each checkpoint)."""
    by_layer: dict[tuple[int, int, int], list[LayerCheckpoint]] = defaultdict(list)
    for ckpt in ckpts:
        start, stop = heldout_range(store, ckpt.info.config.heldout_tail_fraction, cfg.recon_tokens, str(ckpt.path))
        by_layer[ckpt.layer, start, stop].append(ckpt)
    layers = [key[0] for key in by_layer]
    if len(layers) != len(set(layers)):
        raise UserError(f"checkpoints of one layer were trained with different heldout_tail_fraction values, so "
                        f"they have no common held-out rows to be compared on: "
                        f"{sorted({c.key: c.info.config.heldout_tail_fraction for c in ckpts}.items())}")
    results, densities = [], {}
    bar = tqdm(total=len(ckpts), desc="store metrics", unit="SAE", disable=not progress)
    for (layer, start, stop), group in sorted(by_layer.items()):
        rows = heldout_rows(store, layer, start, stop)
        train_x, train_seq = training_sample(store, layer, start, cfg.head_rows, seed_of(cfg.seed, 4, layer))
        figures, extras = {}, {}
        for ckpt in sorted(group, key=lambda c: not c.sae.high_level):  # blocks first: the others match them
            lags = LagSums(rows, ckpt.sae.d_sae)
            p = sae_pass(ckpt.sae, rows, cfg.sae_batch_size, lags.add)
            densities[ckpt.key] = p.fires_DF.sum(axis=0) / max(len(rows.x_NM), 1)
            figs = reconstruction_figures(p, cfg.dense_thresholds)
            block = block_features(ckpt, group, densities)
            smooth, smooth_ext = smoothness_figures(lags, block)
            smooth_ext.update(rate_gap(ckpt, group, densities, block))
            figs.update(smooth)
            live = torch.from_numpy(np.flatnonzero(p.fires_DF.sum(axis=0) > 0))
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, 7, layer, ckpt.seed))
            figs.update(disentanglement_figures(ckpt.sae, p.codes_NF, live, cfg.coact_features, gen))
            ext: dict[str, float] = {"eval_rows": len(rows.x_NM), "eval_docs": rows.n_docs,
                                     "dead_features": int((p.fires_DF.sum(axis=0) == 0).sum()), **smooth_ext}
            if rows.topic_D is not None:
                topic, topic_ext = topic_figures(p.fires_DF, p.n_D, rows.topic_D, rows.n_topics,
                                                 min_fires=cfg.topic_min_fires, permutations=cfg.topic_permutations,
                                                 fdr=cfg.topic_fdr, seed=seed_of(cfg.seed, 5, layer, ckpt.seed))
                figs.update(topic)
                ext.update(topic_ext)
            seed = seed_of(cfg.seed, 6, layer, ckpt.seed)
            con, con_ext = contrastive_figures(ckpt.sae, ckpt.head, ckpt.info, rows, p.codes_NF, train_x, train_seq,
                                               cfg, seed)
            figs.update(con)
            ext.update(con_ext)
            figures[ckpt.key], extras[ckpt.key] = figs, ext
            bar.update(1)
        results.append(FamilyResult(Units((rows.n_docs,)), figures, extras))
    bar.close()
    return results, densities
