"""Metrics that need the language model: downstream CE/KL scores and the unlearning protocol."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from csae.evaluate.checkpoints import LayerCheckpoint
from csae.evaluate.downstream import downstream_losses, downstream_metrics, sae_splice, zero_splice
from csae.evaluate.lm import Restart, clean_pass
from csae.evaluate.text import TextBatch, alternate, batches, build_sequences, round_robin
from csae.evaluate.unlearn import (
    EvalText,
    random_features,
    select_features,
    selection_stats,
    sweep,
    unlearning_ce_score,
    unlearning_score,
    zero_intervention,
)
from csae.shared import corpora
from csae.shared.config.evaluate import EvalConfig
from csae.shared.models import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSource:
    dataset: str
    heldout_doc_fraction: float
    context: int


def _batches(lm: LoadedModel, docs: Any, src: TextSource, budget: int, cfg: EvalConfig,
             unit: str = "predictions") -> list[TextBatch]:
    tok = lm.tokenizer
    seqs = build_sequences(docs, tok, src.context, budget, unit=unit)  # type: ignore[arg-type]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return batches(seqs, cfg.lm_batch_size, pad, tok.bos_token_id is not None)


def ce_metrics(lm: LoadedModel, ckpts: list[LayerCheckpoint], src: TextSource, cfg: EvalConfig,
               progress: bool) -> dict[str, dict[str, Any]]:
    """{checkpoint key: CE/KL metrics} on cfg.ce_tokens predictions of held-out corpus text."""
    docs = corpora.iter_documents(src.dataset, "heldout", src.heldout_doc_fraction)
    text = _batches(lm, docs, src, cfg.ce_tokens, cfg)
    if not text:
        log.warning("corpus %r has no held-out text; downstream CE/KL skipped", src.dataset)
        return {}
    layers = sorted({c.layer for c in ckpts})
    interventions: dict[Any, Any] = {("zero", layer): (layer, zero_splice) for layer in layers}
    interventions.update({c.key: (c.layer, sae_splice(c.sae)) for c in ckpts})
    result = downstream_losses(lm.model, text, interventions, cfg.logit_chunk, progress=progress)
    return {c.key: downstream_metrics(result, c.key, ("zero", c.layer)) for c in ckpts}


def _topic_docs(src: TextSource, cfg: EvalConfig) -> tuple[list[Any], list[list[Any]]] | None:
    by_topic: dict[str, list[Any]] = defaultdict(list)
    for doc in corpora.iter_documents(src.dataset, "heldout", src.heldout_doc_fraction):
        by_topic[doc.topic].append(doc)
    retain = [by_topic[t] for t in cfg.retain_topics if by_topic.get(t)]
    if not by_topic.get(cfg.forget_topic) or not retain:
        log.warning(f"unlearning skipped: the held-out split of {src.dataset!r} has no documents of the forget "
                      f"topic {cfg.forget_topic!r} or of the retain topics {list(cfg.retain_topics)} (its topics: "
                      f"{sorted(t for t in by_topic if t)}); set --forget-topic/--retain-topics")
        return None
    return by_topic[cfg.forget_topic], retain


def _selection_residuals(lm: LoadedModel, text: list[TextBatch], layers: list[int]) -> dict[int, torch.Tensor]:
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for batch in text:
        clean = clean_pass(lm.model, batch, layers, final=False)
        for layer in layers:
            out[layer].append(clean.resid[layer][batch.text_BT])
    return {layer: torch.cat(v) for layer, v in out.items()}


def unlearning_metrics(lm: LoadedModel, ckpts: list[LayerCheckpoint], src: TextSource, cfg: EvalConfig,
                       progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({checkpoint key: unlearning metrics}, {checkpoint key: sweep points}) or empty when skipped."""
    found = _topic_docs(src, cfg)
    if found is None:
        return {}, {}
    forget_docs, retain_groups = found
    forget_sel, forget_eval = alternate(forget_docs)
    halves = [alternate(g) for g in retain_groups]
    retain_sel, retain_eval = round_robin([h[0] for h in halves]), round_robin([h[1] for h in halves])
    layers = sorted({c.layer for c in ckpts})
    sel_f = _selection_residuals(lm, _batches(lm, forget_sel, src, cfg.select_tokens, cfg, "tokens"), layers)
    sel_r = _selection_residuals(lm, _batches(lm, retain_sel, src, cfg.select_tokens, cfg, "tokens"), layers)
    forget = EvalText(lm.model, _batches(lm, forget_eval, src, cfg.unlearn_tokens, cfg), layers, cfg.logit_chunk)
    retain = EvalText(lm.model, _batches(lm, retain_eval, src, cfg.unlearn_tokens, cfg), layers, cfg.logit_chunk)
    if not forget.items or not retain.items or not len(sel_f[layers[0]]) or not len(sel_r[layers[0]]):
        log.warning("unlearning skipped: too little forget or retain text")
        return {}, {}
    restart = _verified_restart(lm, forget.items[0].batch, layers)

    zero = {layer: (forget.evaluate(restart, layer, zero_intervention)[1],
                    retain.evaluate(restart, layer, zero_intervention)[1]) for layer in layers}
    n_points = len(cfg.retain_thresholds) * len(cfg.ns) * len(cfg.cs) * (2 if cfg.random_control else 1) * len(ckpts)
    bar = tqdm(total=n_points, desc="unlearning sweep", unit="pt", disable=not progress)
    metrics, points = {}, {}
    for ckpt in ckpts:
        sel = selection_stats(ckpt.sae, sel_f[ckpt.layer], sel_r[ckpt.layer], cfg.sae_batch_size)
        forget_gap = zero[ckpt.layer][0] - forget.ce_clean
        retain_gap = zero[ckpt.layer][1] - retain.ce_clean

        def score(pts: list[dict[str, Any]], fg: float = forget_gap, rg: float = retain_gap) -> tuple[float, float]:
            return (unlearning_score(pts, cfg.retain_accuracy),
                    unlearning_ce_score(pts, fg, rg, cfg.retain_ce_tolerance))

        main = sweep(ckpt.sae, sel, forget, retain, restart, ckpt.layer, cfg.retain_thresholds, cfg.ns, cfg.cs,
                     lambda tau, n, sel=sel: select_features(sel.nu_forget_F, sel.nu_retain_F, tau, n), bar)
        u, u_ce = score(main)
        m: dict[str, Any] = {"unlearn_U": u, "unlearn_U_CE": u_ce, "unlearn_forget_known": forget.n_known,
                             "unlearn_retain_known": retain.n_known, "unlearn_forget_predictions": forget.n_predictions,
                             "unlearn_retain_predictions": retain.n_predictions,
                             "unlearn_ce_forget_clean": forget.ce_clean, "unlearn_ce_forget_zero": zero[ckpt.layer][0],
                             "unlearn_ce_retain_clean": retain.ce_clean, "unlearn_ce_retain_zero": zero[ckpt.layer][1]}
        pts: dict[str, Any] = {"selected": main}
        if cfg.random_control:
            def choose_random(tau: float, n: int, layer: int = ckpt.layer, sel: Any = sel) -> torch.Tensor:
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer * 7919 + n * 31 + round(tau * 1e6))
                return random_features(sel.nu_retain_F, tau, n, gen)

            rand = sweep(ckpt.sae, sel, forget, retain, restart, ckpt.layer, cfg.retain_thresholds, cfg.ns, cfg.cs,
                         choose_random, bar)
            u_r, u_ce_r = score(rand)
            m.update({"unlearn_U_random": u_r, "unlearn_U_minus_random": u - u_r, "unlearn_U_CE_random": u_ce_r,
                      "unlearn_U_CE_minus_random": u_ce - u_ce_r})
            pts["random"] = rand
        metrics[ckpt.key], points[ckpt.key] = m, pts
    bar.close()
    return metrics, points


def _verified_restart(lm: LoadedModel, batch: TextBatch, layers: list[int]) -> Restart:
    clean = clean_pass(lm.model, batch, layers)
    restart = Restart(lm.model, clean.tuple_out)
    for layer in layers:
        restart.verify(batch, clean, layer)
    return restart
