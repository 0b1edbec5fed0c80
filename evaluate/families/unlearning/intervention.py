"""The mechanics of the unlearning protocol: feature selection (SAEBench's), the matched random control, the
clamp, and scoring an intervention on evaluation text per document. The protocol itself (splits, sweep,
choice, test) is evaluate/families/unlearning/protocol.py; formulas in docs/metrics.md.

Only predictions at or after the first position where the intervention changes the residual are
recomputed (causal attention leaves earlier ones exactly clean); sequences without a change are skipped.
Top-1 accuracy alone uses the exact shortcut of evaluate/lm/passes.py (`still_top1`), so the 262k-way head runs
only where CE is asked for or the shortcut's bound cannot decide.

Shape suffixes: N tokens, F features, K selected features, B sequences, T positions, D documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from csae.evaluate.lm.passes import (
    SHORTCUT_CANDIDATES,
    Restart,
    Top1Reference,
    clean_pass,
    still_top1,
    top1_reference,
)
from csae.evaluate.lm.text import TextBatch
from csae.evaluate.lm.vocab import token_stats

#: x (N, D) at text positions -> (intervened x (N, D), changed (N,) bool)
Intervention = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: Matched control: each selected feature's stand-in is drawn uniformly from this many unused features
#: nearest to it in log forget firing rate.
MATCH_POOL = 10


@dataclass(frozen=True)
class Selection:
    nu_forget_F: torch.Tensor
    """Share of forget-selection tokens on which each feature fires."""
    nu_retain_F: torch.Tensor
    """Share of retain-selection tokens on which each feature fires."""
    mean_act_F: torch.Tensor
    """a_j: mean activation of feature j over the forget-selection tokens where it fires (0 if never)."""


@torch.inference_mode()
def selection_stats(sae: Any, forget_x_ND: torch.Tensor, retain_x_ND: torch.Tensor, batch: int = 4096) -> Selection:
    """Firing rates on forget and retain selection text, and mean positive activations on forget text."""

    def stats(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fires = torch.zeros(sae.d_sae, dtype=torch.float64)
        total = torch.zeros(sae.d_sae, dtype=torch.float64)
        for s in range(0, len(x_ND), batch):
            f = sae.encode(x_ND[s:s + batch].to(sae.W_enc.dtype)).double()
            fires += (f > 0).sum(dim=0)
            total += f.sum(dim=0)
        return fires, total

    fires_f, total_f = stats(forget_x_ND)
    fires_r, _ = stats(retain_x_ND)
    return Selection(nu_forget_F=fires_f / max(len(forget_x_ND), 1), nu_retain_F=fires_r / max(len(retain_x_ND), 1),
                     mean_act_F=torch.where(fires_f > 0, total_f / fires_f.clamp_min(1), torch.zeros_like(total_f)))


def select_features(nu_forget_F: torch.Tensor, nu_retain_F: torch.Tensor, tau: float, n: int) -> torch.Tensor:
    """Indices of the n features with the highest nu_forget among those with nu_retain < tau and nu_forget > 0
    (fewer if fewer qualify); ties broken by feature index."""
    candidates = torch.nonzero((nu_retain_F < tau) & (nu_forget_F > 0)).squeeze(1)
    order = torch.argsort(-nu_forget_F[candidates].double(), stable=True)
    return candidates[order[:n]]


def matched_features(nu_forget_F: torch.Tensor, selected_K: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The random control: for each selected feature, a different feature that fires on forget selection
    text at about the same rate (uniform among the MATCH_POOL unused ones nearest in log rate); sorted."""
    nu = nu_forget_F.double().numpy()
    chosen = set(selected_K.tolist())
    available = np.array([j for j in np.flatnonzero(nu > 0) if j not in chosen])
    picked: list[int] = []
    for j in selected_K.tolist():
        if not len(available):
            break
        distance = np.abs(np.log(nu[available]) - np.log(nu[j]))
        nearest = np.argsort(distance, kind="stable")[:MATCH_POOL]
        k = int(rng.choice(nearest))
        picked.append(int(available[k]))
        available = np.delete(available, k)
    return torch.tensor(sorted(picked), dtype=torch.long)


@torch.inference_mode()
def clamp_intervention(x_ND: torch.Tensor, sae: Any, feats_K: torch.Tensor, a_K: torch.Tensor,
                       c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's clamp: f = encode(x), err = x - decode(f); f'_j = -c a_j where j is selected and
    f_j > 0, else f'_j = f_j; output err + decode(f'). Returns (output, changed) with changed[t] true when
    any selected feature fires at t. Where none fires the formula gives x, and x is returned exactly."""
    x = x_ND.to(sae.W_enc.dtype)
    f_NF = sae.encode(x)
    fires_NK = f_NF[:, feats_K] > 0
    changed_N = fires_NK.any(dim=1)
    f_new = f_NF.clone()
    f_new[:, feats_K] = torch.where(fires_NK, -c * a_K.to(f_NF.dtype), f_NF[:, feats_K])
    out = (x - sae.decode(f_NF)) + sae.decode(f_new)
    return torch.where(changed_N.unsqueeze(1), out, x).to(x_ND.dtype), changed_N


def zero_intervention(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(x_ND), torch.ones(len(x_ND), dtype=torch.bool)


@dataclass
class Score:
    """An intervention's effect on a text, summed per document (the bootstrap's unit)."""

    kept_D: np.ndarray
    """Known tokens (the clean model's argmax is right) still right."""
    known_D: np.ndarray
    nll_D: np.ndarray | None
    """Sum of -log p(target) over all predictions (only when CE was asked for)."""
    n_D: np.ndarray
    """Predictions."""
    head_predictions: int = 0
    """Predictions that ran the full LM head (CE, or where the top-1 shortcut's bound did not decide)."""

    @property
    def accuracy(self) -> float:
        return float(self.kept_D.sum() / max(self.known_D.sum(), 1))


@dataclass
class _Clean:
    batch: TextBatch
    resid: dict[int, torch.Tensor]
    logp_BT: torch.Tensor
    correct_BT: torch.Tensor
    known_index_BT: torch.Tensor
    """Index into `ref` of each known position, -1 elsewhere."""
    ref: Top1Reference


@dataclass
class _Job:
    """One intervention's restart on one batch of text."""

    rows: torch.Tensor
    """The sequences it changes."""
    redo_RT: torch.Tensor
    """Positions of those rows whose prediction is recomputed."""
    resid_RTD: torch.Tensor
    """Their residual at the layer with the intervention applied (float32)."""

    @property
    def stop_R(self) -> torch.Tensor:
        """One past each row's last recomputed position (0: none): the restart ends there (`Restart.many`)."""
        t = self.redo_RT.shape[1]
        last = t - 1 - self.redo_RT.flip(1).int().argmax(dim=1)
        return torch.where(self.redo_RT.any(dim=1), last + 1, 0)


class EvalText:
    """Evaluation text with its clean pass cached: residuals at the layers, clean log p, known tokens and
    what the top-1 shortcut needs."""

    def __init__(self, model: Any, layers: list[int], chunk: int) -> None:
        self.model, self.layers, self.chunk = model, layers, chunk
        self.items: list[_Clean] = []
        self.tuple_out = False

    def add(self, batch: TextBatch) -> None:
        clean = clean_pass(self.model, batch, self.layers)
        self.tuple_out = clean.tuple_out
        pred = batch.pred_BT
        vocab = self.model.get_output_embeddings().weight.shape[0]
        (st,) = token_stats(self.model, batch.targets_BT[pred], [clean.final_BTD[pred]], self.chunk,
                            topk=min(SHORTCUT_CANDIDATES + 1, vocab))
        logp, correct = torch.zeros(pred.shape), torch.zeros(pred.shape, dtype=torch.bool)
        logp[pred], correct[pred] = st.logp_N, st.correct_N
        known = st.correct_N
        index = torch.full(pred.shape, -1, dtype=torch.long)
        index[pred & correct] = torch.arange(int(known.sum()))
        ref = top1_reference(self.model, clean.final_BTD[pred][known], batch.targets_BT[pred][known],
                             st.top_NK[known])  # type: ignore[index]
        self.items.append(_Clean(batch, clean.resid, logp, correct, index, ref))

    @property
    def n_docs(self) -> int:
        return 1 + max((int(it.batch.doc_B.max()) for it in self.items), default=-1)

    def stages(self) -> Iterator[EvalText]:
        """The text in consecutive parts of 1, 1, 2, 4, ... batches: each part doubles the prefix scored."""
        start = 0
        while start < len(self.items):
            part = EvalText(self.model, self.layers, self.chunk)
            part.items, part.tuple_out = self.items[start:start + max(1, start)], self.tuple_out
            yield part
            start += max(1, start)

    def extend(self, other: EvalText) -> None:
        """Append another text's cached batches (their documents are numbered in one sequence already)."""
        self.items.extend(other.items)
        self.tuple_out = self.tuple_out or other.tuple_out

    def up_to_doc(self, last: int) -> EvalText:
        """The same text without the sequences of documents after `last`, their clean passes kept (each row's
        clean pass depends only on itself; padding past the longest kept row is cut)."""
        out = EvalText(self.model, self.layers, self.chunk)
        out.tuple_out = self.tuple_out
        for it in self.items:
            rows = torch.nonzero(it.batch.doc_B <= last).squeeze(1)
            if not len(rows):
                continue
            b = it.batch
            t = int(b.lengths_B[rows].max())
            batch = TextBatch(b.ids_BT[rows, :t], b.lengths_B[rows], b.first, b.doc_B[rows])
            old_BT = it.known_index_BT[rows, :t]
            keep = old_BT >= 0
            old = old_BT[keep]  # row-major, so the kept known positions stay in the reference's order
            index = torch.full_like(old_BT, -1)
            index[keep] = torch.arange(len(old))
            ref = Top1Reference(it.ref.h_ND[old], it.ref.cand_NK[old], it.ref.out_N[old])
            out.items.append(_Clean(batch, {k: v[rows, :t] for k, v in it.resid.items()}, it.logp_BT[rows, :t],
                                    it.correct_BT[rows, :t], index, ref))
        return out

    @property
    def n_known(self) -> int:
        return int(sum(int(it.correct_BT.sum()) for it in self.items))

    @property
    def n_predictions(self) -> int:
        return sum(it.batch.n_predictions for it in self.items)

    def clean(self) -> Score:
        """The clean model's own score (every known token kept)."""
        return self.score(None, self.layers[0], None, ce=True)

    def residuals(self, layer: int) -> torch.Tensor:
        return torch.cat([it.resid[layer][it.batch.text_BT] for it in self.items])

    def score(self, restart: Restart | None, layer: int, intervention: Intervention | None, *, ce: bool) -> Score:
        """Known tokens kept per document under the intervention at `layer` (and CE sums when `ce`)."""
        return self.score_many(restart, layer, [intervention], ce=ce)[0]

    def score_many(self, restart: Restart | None, layer: int, interventions: list[Intervention | None], *,
                   ce: bool) -> list[Score]:
        """`score` of several interventions at one layer; their restarted forwards share forwards per batch of
        text (`Restart.many`), so adding one costs its changed rows, not a forward of its own."""
        d, k = self.n_docs, len(interventions)
        sums = np.zeros((k, 4, d))  # kept, known, nll, predictions
        head = [0] * k
        for it in self.items:
            b = it.batch
            text, pred = b.text_BT, b.pred_BT
            jobs: list[tuple[int, _Job]] = []
            for i, intervention in enumerate(interventions):
                if intervention is not None and restart is not None:
                    out, changed = intervention(it.resid[layer][text])
                    if changed.any():
                        jobs.append((i, self._job(it, layer, out, changed, ce)))
            finals = restart.many([(b.ids_BT[j.rows], j.resid_RTD) for _, j in jobs], layer,
                                  stops=[j.stop_R for _, j in jobs]) if restart else []
            scored = {i: self._finish(it, j, final, ce) for (i, j), final in zip(jobs, finals, strict=True)}
            doc_BT = b.doc_B.unsqueeze(1).expand_as(b.ids_BT)
            known_BT = it.correct_BT & pred
            docs_known, docs_pred = doc_BT[known_BT].numpy(), doc_BT[pred].numpy()
            for i in range(k):
                logp, correct, used = scored.get(i, (it.logp_BT, it.correct_BT, 0))
                head[i] += used
                sums[i, 0] += np.bincount(docs_known, weights=correct[known_BT].double().numpy(), minlength=d)
                sums[i, 1] += np.bincount(docs_known, minlength=d)
                sums[i, 2] -= np.bincount(docs_pred, weights=logp[pred].double().numpy(), minlength=d)
                sums[i, 3] += np.bincount(docs_pred, minlength=d)
        return [Score(sums[i, 0], sums[i, 1], sums[i, 2] if ce else None, sums[i, 3], head[i]) for i in range(k)]

    def _job(self, it: _Clean, layer: int, out: torch.Tensor, changed: torch.Tensor, ce: bool) -> _Job:
        """The rows of a batch that an intervention changes, their new residual and the positions to redo (from
        the first change on; known ones only unless CE is asked for)."""
        b = it.batch
        text, pred = b.text_BT, b.pred_BT
        changed_BT = torch.zeros_like(text)
        changed_BT[text] = changed
        rows = torch.nonzero(changed_BT.any(dim=1)).squeeze(1)
        first_R = changed_BT[rows].float().argmax(dim=1)
        redo_RT = pred[rows] & (torch.arange(text.shape[1]) >= first_R.unsqueeze(1))
        if not ce:  # only known tokens count for accuracy
            redo_RT &= it.correct_BT[rows]
        resid = it.resid[layer].clone()
        resid[text] = out.float()
        return _Job(rows, redo_RT, resid[rows])

    def _finish(self, it: _Clean, job: _Job, final_RTD: torch.Tensor,
                ce: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(log p, correct, predictions that ran the full head) of a batch after the intervention."""
        b, rows, redo_RT = it.batch, job.rows, job.redo_RT
        logp, correct = it.logp_BT.clone(), it.correct_BT.clone()
        sub_lp, sub_c = logp[rows], correct[rows]
        if ce:
            (st,) = token_stats(self.model, b.targets_BT[rows][redo_RT], [final_RTD[redo_RT]], self.chunk)
            sub_lp[redo_RT], sub_c[redo_RT] = st.logp_N, st.correct_N
            used = int(redo_RT.sum())
        else:
            idx = it.known_index_BT[rows][redo_RT]
            sub_ref = Top1Reference(it.ref.h_ND[idx], it.ref.cand_NK[idx], it.ref.out_N[idx])
            sub_c[redo_RT], used = still_top1(self.model, sub_ref, final_RTD[redo_RT], self.chunk)
        logp[rows], correct[rows] = sub_lp, sub_c
        return logp, correct, used
