"""Work shared across the SAEs of a layer: stacked restarted forwards equal one-at-a-time forwards (for SAEs of
different sizes), the clean and zero-ablation passes run once per (layer, text) whatever the number of SAEs,
and the unlearning sweep's bounds keep the full sweep's choice on planted problems."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from tiny_eval import random_sae
from tolerances import BATCHED_RESTART_TOLERANCE
from transformers import AutoModelForCausalLM, AutoTokenizer

from csae.evaluate.families import downstream as ds
from csae.evaluate.families.unlearning import intervention as iv
from csae.evaluate.families.unlearning import protocol
from csae.evaluate.families.unlearning import sweep as sw
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.lm.passes import Restart, clean_pass
from csae.evaluate.lm.text import Piece, TextSource, batches
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.train import TrainConfig
from csae.shared.lm.models import LoadedModel
from csae.shared.numerics import relative_error
from csae.shared.sae.checkpoint import LayerInfo

LAYER = 1
SIZES = (32, 256, 100)  # SAEs of different widths at one layer


def _model(path: Path, dtype: str) -> Any:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.requires_grad_(False)
    return model


def _pieces(vocab: int) -> list[Piece]:
    gen = torch.Generator().manual_seed(0)
    seqs = [[2, *torch.randint(4, vocab, (n,), generator=gen).tolist()] for n in (17, 9, 12, 5, 17, 3, 14)]
    return [Piece(s, i // 2) for i, s in enumerate(seqs)]


def _text(vocab: int) -> list[Any]:
    return batches(_pieces(vocab), 4, pad_id=0, has_bos=True)


def test_stacked_restarts_equal_one_at_a_time(tiny_gemma3: Path, dtype: str) -> None:
    """Final hidden states of the SAE splices (three widths) and the zero-ablations of one layer, restarted in
    shared forwards, equal each restart run alone; also when the stack is cut into several forwards."""
    model = _model(tiny_gemma3, dtype)
    d = model.config.hidden_size
    saes = [random_sae(d, f, seed=i, bias=-0.05) for i, f in enumerate(SIZES)]
    splices: dict[Any, tuple[int, ds.Splice]] = {("zero", LAYER): (LAYER, ds.zero_splice),
                                                 ("zero_all", LAYER): (LAYER, ds.zero_all_splice)}
    splices.update({f: (LAYER, ds.sae_splice(sae)) for f, sae in zip(SIZES, saes, strict=True)})
    tol = BATCHED_RESTART_TOLERANCE[dtype]
    for batch in _text(model.config.vocab_size):
        clean = clean_pass(model, batch, [LAYER])
        restart = Restart(model, clean.tuple_out)
        alone = {k: restart(batch.ids_BT, LAYER, fn(clean.resid[LAYER], batch.text_BT)) for k, (_, fn) in
                 splices.items()}
        stacked = ds.restarted(restart, batch, clean.resid, splices)
        jobs = [(batch.ids_BT, fn(clean.resid[LAYER], batch.text_BT)) for _, fn in splices.values()]
        cut = restart.many(jobs, LAYER, tokens=3 * batch.ids_BT.shape[1])  # 3 rows per forward
        text = batch.text_BT
        for (key, want), got_cut in zip(alone.items(), cut, strict=True):
            assert relative_error(stacked[key][text], want[text]) <= tol, key
            assert relative_error(got_cut[text], want[text]) <= tol, key
        # not vacuous: the interventions' final states differ by far more than the tolerance
        assert relative_error(alone[SIZES[0]][text], alone[SIZES[1]][text]) > 10 * tol


class _CountingRestart(Restart):
    """A restart that counts the tokens of each forward it runs."""

    def __init__(self, model: Any, tuple_out: bool) -> None:
        super().__init__(model, tuple_out)
        self.tokens: list[int] = []

    def __call__(self, ids_BT: torch.Tensor, layer: int, resid_BTD: torch.Tensor) -> torch.Tensor:
        self.tokens.append(ids_BT.numel())
        return super().__call__(ids_BT, layer, resid_BTD)


def test_restarts_cut_at_each_rows_stop_equal_whole_restarts(tiny_gemma3: Path, dtype: str) -> None:
    """`Restart.many` with stops: every row's final states before its stop equal the whole restart of that row
    alone; positions from the stop on are 0, a row with stop 0 runs no forward, and the forwards hold fewer
    tokens than whole rows would."""
    model = _model(tiny_gemma3, dtype)
    d = model.config.hidden_size
    tol = BATCHED_RESTART_TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(1)
    for batch in _text(model.config.vocab_size):
        clean = clean_pass(model, batch, [LAYER])
        restart = Restart(model, clean.tuple_out)
        jobs = [(batch.ids_BT, ds.sae_splice(random_sae(d, f, seed=i, bias=-0.05))(clean.resid[LAYER], batch.text_BT))
                for i, f in enumerate(SIZES)]
        n, t = batch.ids_BT.shape
        stops = [torch.randint(0, t + 1, (n,), generator=gen) for _ in jobs]
        stops[0][0] = 0
        counting = _CountingRestart(model, clean.tuple_out)
        cut = counting.many(jobs, LAYER, tokens=2 * t, stops=stops)
        assert sum(int(s.sum()) for s in stops) <= sum(counting.tokens) < n * t * len(jobs)
        for (ids, resid), got, stop in zip(jobs, cut, stops, strict=True):
            want = restart(ids, LAYER, resid)
            for r in range(n):
                s = int(stop[r])
                if s:
                    assert relative_error(got[r, :s], want[r, :s]) <= tol
                assert not got[r, s:].any()


def test_scores_with_cut_restarts_equal_whole_restarts(tiny_gemma3: Path, dtype: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlearning scores when each restart ends after its last recomputed position equal those of whole-row
    restarts (stop = T for every row): the same known tokens kept, CE sums within the restart tolerance."""
    model = _model(tiny_gemma3, dtype)
    text = iv.EvalText(model, [LAYER], chunk=16)
    for batch in _text(model.config.vocab_size):
        text.add(batch)
    restart = Restart(model, text.tuple_out)
    saes = [random_sae(model.config.hidden_size, f, seed=i, bias=-0.05) for i, f in enumerate(SIZES)]
    clamps = [lambda x, sae=sae: iv.clamp_intervention(x, sae, torch.arange(0, sae.d_sae, 3),
                                                        torch.ones(len(range(0, sae.d_sae, 3))), 5.0) for sae in saes]
    for ce in (False, True):
        cut = text.score_many(restart, LAYER, clamps, ce=ce)
        with monkeypatch.context() as m:
            m.setattr(iv._Job, "stop_R", property(lambda j: torch.full((len(j.rows),), j.redo_RT.shape[1])))
            whole = text.score_many(restart, LAYER, clamps, ce=ce)
        for got, want in zip(cut, whole, strict=True):
            assert np.abs(got.kept_D - want.kept_D).sum() <= (0 if dtype == "float32" else 1)
            if ce:
                assert got.nll_D == pytest.approx(want.nll_D, rel=BATCHED_RESTART_TOLERANCE[dtype])
        assert min(s.accuracy for s in cut) < 0.9  # not vacuous: the clamps change predictions


def test_text_cut_to_its_first_documents_scores_as_that_text(tiny_gemma3: Path) -> None:
    """`EvalText.up_to_doc`: the cached text without its later documents scores (kept, known, CE sums per
    document) as the same documents cleaned on their own."""
    model = _model(tiny_gemma3, "float32")
    pieces = _pieces(model.config.vocab_size)
    last = 1

    def text_of(part: list[Piece]) -> iv.EvalText:
        text = iv.EvalText(model, [LAYER], chunk=16)
        for batch in batches(part, 4, pad_id=0, has_bos=True):
            text.add(batch)
        return text

    cut = text_of(pieces).up_to_doc(last)
    alone = text_of([p for p in pieces if p.doc <= last])
    assert cut.n_known == alone.n_known > 0 and cut.n_docs == alone.n_docs == last + 1
    restart = Restart(model, alone.tuple_out)
    sae = random_sae(model.config.hidden_size, 64, seed=0, bias=-0.05)
    clamp = lambda x: iv.clamp_intervention(x, sae, torch.arange(0, 64, 2), torch.ones(32), 5.0)  # noqa: E731
    for ce in (False, True):
        got, want = cut.score(restart, LAYER, clamp, ce=ce), alone.score(restart, LAYER, clamp, ce=ce)
        assert (got.kept_D == want.kept_D).all() and (got.known_D == want.known_D).all()
        if ce:
            assert got.nll_D == pytest.approx(want.nll_D, rel=BATCHED_RESTART_TOLERANCE["float32"])


def test_stacked_unlearning_scores_equal_one_at_a_time(tiny_gemma3: Path, dtype: str) -> None:
    """`EvalText.score_many` of several SAEs' interventions equals `score` of each alone: the same known tokens
    kept (top-1 shortcut) and CE sums within float32's rounding of a sum (bfloat16: the restart tolerance)."""
    model = _model(tiny_gemma3, dtype)
    d = model.config.hidden_size
    text = iv.EvalText(model, [LAYER], chunk=16)
    for batch in _text(model.config.vocab_size):
        text.add(batch)
    restart = Restart(model, text.tuple_out)

    def splice(sae: Any) -> iv.Intervention:
        def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = sae(x.to(sae.W_enc.dtype))[0].float()
            return out, (out - x).abs().amax(dim=1) > 0.5 * x.abs().amax(dim=1)  # rows of some change only

        return fn

    interventions = [splice(random_sae(d, f, seed=i, bias=-0.05)) for i, f in enumerate(SIZES)]
    for ce in (False, True):
        many = text.score_many(restart, LAYER, [None, *interventions], ce=ce)
        for got, intervention in zip(many, [None, *interventions], strict=True):
            want = text.score(restart, LAYER, intervention, ce=ce)
            assert np.abs(got.kept_D - want.kept_D).sum() <= (0 if dtype == "float32" else 1)
            assert (got.known_D == want.known_D).all() and (got.n_D == want.n_D).all()
            if ce:
                assert got.nll_D == pytest.approx(want.nll_D, rel=BATCHED_RESTART_TOLERANCE[dtype])
        assert many[0].accuracy == 1.0 and min(s.accuracy for s in many[1:]) < 0.9  # not vacuous


def _ckpts(d: int, n: int, layers: tuple[int, ...]) -> list[LayerCheckpoint]:
    out = []
    for layer, i in itertools.product(layers, range(n)):
        sae = random_sae(d, 64 + 16 * i, seed=i, bias=-0.05)
        info = LayerInfo(config=TrainConfig(), seed=i, layer=layer, store="", model={}, scale=1.0, d_in=d,
                         d_sae=sae.d_sae, train_rows=0)
        out.append(LayerCheckpoint("run", i, layer, Path("."), sae, None, info))
    return out


@pytest.mark.slow
def test_clean_and_zero_passes_run_once_per_layer_and_text(tiny_gemma3: Path, topic_corpus: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted through hooks on the functions that run them: the clean pass once per batch of text, the
    zero-ablations once per (layer, batch), for 1 and for 4 SAEs per layer, in both LM families."""
    model = _model(tiny_gemma3, "float32")
    lm = LoadedModel(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_gemma3), identity={})
    src = TextSource(str(topic_corpus), 0.5, 33)
    cfg = EvalConfig(ce_tokens=200, ce_doc_predictions=0, lm_batch_size=4, select_tokens=200,
                     sweep_predictions=60, unlearn_known=100, random_draws=2)
    counts: dict[str, int] = {}

    def counting(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapped

    for module in (ds, iv, protocol):
        monkeypatch.setattr(module, "clean_pass", counting(module.__name__, clean_pass))
    monkeypatch.setattr(ds, "zero_splice", counting("zero", ds.zero_splice))
    monkeypatch.setattr(ds, "zero_all_splice", counting("zero_all", ds.zero_all_splice))
    monkeypatch.setattr(protocol, "zero_intervention", counting("zero_unlearn", iv.zero_intervention))
    seen = []
    for n in (1, 4):
        counts.clear()
        ckpts = _ckpts(model.config.hidden_size, n, (1, 2))
        ds.downstream(lm, ckpts, src, cfg, progress=False)
        assert protocol.unlearning(lm, ckpts, src, cfg, progress=False) is not None
        seen.append(dict(counts))
    assert seen[0] == seen[1]  # nothing grows with the number of SAEs
    n_batches = seen[0][ds.__name__]
    assert n_batches >= 2 and seen[0]["zero"] == seen[0]["zero_all"] == 2 * n_batches  # 2 layers x batches
    assert seen[0]["zero_unlearn"] >= 2 and seen[0][iv.__name__] >= 4


class _Tag:
    """A planted setting: what `clamp_of` returns in the sweep test (its features and multiplier)."""

    def __init__(self, sae: int, feats: tuple[int, ...], c: float) -> None:
        self.key = (sae, feats, c)


class _Part:
    def __init__(self, kept: dict[Any, int], known: int) -> None:
        self.kept, self.n_known = kept, known
        self.asked = 0

    def score_many(self, _restart: Any, _layer: int, tags: list[_Tag], *, ce: bool) -> list[iv.Score]:
        self.asked = len(tags)
        z = np.zeros(1)
        return [iv.Score(np.array([float(self.kept[t.key])]), np.array([float(self.n_known)]), None, z) for t in tags]


class _Forget:
    """Forget text of planted parts: each setting keeps a planted number of the known tokens of each part."""

    def __init__(self, parts: list[_Part]) -> None:
        self.parts = parts
        self.n_known = sum(p.n_known for p in parts)

    def stages(self) -> Any:
        yield from self.parts


class _Retain:
    def __init__(self, accuracy: dict[Any, float]) -> None:
        self.accuracy = accuracy

    def score_many(self, _restart: Any, _layer: int, tags: list[_Tag], *, ce: bool) -> list[iv.Score]:
        return [iv.Score(np.array([self.accuracy[t.key] * 1000]), np.array([1000.0]), None, np.zeros(1)) for t in tags]


def test_bounded_sweep_returns_the_full_sweeps_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted sweeps (2 SAEs, random firing rates so that settings share features, random per-part kept counts
    and retain accuracies): the choice equals the full sweep's, written out here as the rule's minimum over
    every setting's whole-text A_forget, and the sweep scores fewer settings on later parts (it prunes)."""
    rng = random.Random(0)
    cfg = EvalConfig(retain_thresholds=(0.001, 0.01), ns=(10, 20, 50), cs=(2.0, 5.0, 10.0, 20.0))
    pruned = 0
    for trial in range(200):
        gen = torch.Generator().manual_seed(trial)
        sels = [iv.Selection(torch.rand(40, generator=gen) * (torch.rand(40, generator=gen) > 0.3),
                             torch.rand(40, generator=gen) * 0.02, torch.ones(40)) for _ in range(2)]
        keys = {(i, tuple(iv.select_features(s.nu_forget_F, s.nu_retain_F, tau, n).tolist()), c)
                for i, s in enumerate(sels) for tau, n in itertools.product(cfg.retain_thresholds, cfg.ns)
                for c in cfg.cs}
        keys = {k for k in keys if k[1]}
        best_bias = {k: rng.random() for k in keys}  # how much of each part a setting keeps, varied per part
        parts = []
        for _ in range(rng.choice([1, 3, 6])):
            known = rng.randint(5, 40)
            parts.append(_Part({k: min(known, max(0, round(known * (best_bias[k] + rng.uniform(-0.2, 0.2)))))
                                for k in keys}, known))
        retain = {k: rng.choice([1.0, 1.0, 0.995, 0.98]) for k in keys}
        forget = _Forget(parts)
        monkeypatch.setattr(sw, "clamp_of", lambda ckpt, sel, feats, c: _Tag(ckpt.seed, tuple(feats.tolist()), c))
        group = [SimpleNamespace(layer=LAYER, seed=i) for i in range(2)]
        swept = sw.sweep_layer(group, sels, forget, _Retain(retain), None, cfg)  # type: ignore[arg-type]
        for i, pts in enumerate(swept):
            full = []  # the full sweep: every setting passing the retain rule, on the whole text
            for tau, n, c in itertools.product(cfg.retain_thresholds, cfg.ns, cfg.cs):
                feats = tuple(iv.select_features(sels[i].nu_forget_F, sels[i].nu_retain_F, tau, n).tolist())
                if feats and retain[i, feats, c] >= cfg.retain_accuracy:
                    a_f = sum(p.kept[i, feats, c] for p in parts) / forget.n_known
                    full.append((a_f, len(feats), c, tau, feats))
            chosen = sw.choose(pts, cfg.retain_accuracy)
            if not full:
                assert chosen is None
                continue
            want = min(full)
            assert chosen is not None
            assert (chosen["A_forget"], len(chosen["features"]), chosen["c"], chosen["retain_threshold"],
                    tuple(chosen["features"])) == want
        pruned += parts[-1].asked < parts[0].asked  # settings scored on the last part and on the first
    assert pruned > 20  # the bounds do drop settings on these problems
