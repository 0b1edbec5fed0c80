"""Downstream CE/KL against an independent computation: per-sequence full forwards of the transformers
model with a hook replacing block L's output, full-vocabulary log-softmax, no chunking, no restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_eval import identity_sae, random_sae
from tolerances import CE_TOLERANCE, KL_TOLERANCE
from transformers import AutoModelForCausalLM

from csae.evaluate.families.downstream import (
    downstream_figures,
    downstream_losses,
    sae_splice,
    zero_all_splice,
    zero_splice,
)
from csae.evaluate.lm import passes as lm
from csae.evaluate.lm.passes import Restart, check_head, clean_pass
from csae.evaluate.lm.text import Piece, TextBatch, batches, build_sequences
from csae.shared.lm.models import blocks
from csae.shared.sae.autoencoder import SAE


def _reference(model: Any, seqs: list[list[int]], layer: int | None, fn: Any,
               first: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll per prediction, log-probs per prediction) with block `layer`'s output at positions >= first
    replaced by fn(output); layer None: the clean model."""
    nll, logps = [], []
    for s in seqs:
        handle = None
        if layer is not None:
            def hook(_m: Any, _i: Any, out: Any) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                new = h.clone()
                new[:, first:] = fn(h[:, first:])
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handle = blocks(model)[layer].register_forward_hook(hook)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s])).logits[0].double()
        if handle:
            handle.remove()
        lp = torch.log_softmax(logits, dim=-1)[1:-1]  # predictions from text positions, but the last
        targets = torch.tensor(s[2:])
        nll.append(-lp.gather(1, targets.unsqueeze(1)).squeeze(1))
        logps.append(lp)
    return torch.cat(nll), torch.cat(logps)


def _seqs(vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [17, 9, 12, 5, 17, 3]
    return [[2, *torch.randint(4, vocab, (n,), generator=gen).tolist()] for n in lengths]


def _pieces(seqs: list[list[int]]) -> list[Piece]:
    return [Piece(s, i // 2) for i, s in enumerate(seqs)]  # two sequences per document


def _zero_dec(d: int) -> SAE:
    sae = random_sae(d, 32)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_gemma2"])
def test_downstream_losses_equal_independent_forwards(fixture: str, request: pytest.FixtureRequest,
                                                      dtype: str) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    d, vocab = model.config.hidden_size, model.config.vocab_size
    seqs = _seqs(vocab)
    text = batches(_pieces(seqs), 4, pad_id=0, has_bos=True)
    layer = 1
    perfect, zero_dec, noisy = identity_sae(d), _zero_dec(d), random_sae(d, 4 * d, seed=3, bias=-0.05)
    splices = {"perfect": (layer, sae_splice(perfect)), "zero": (layer, zero_splice),
               "zero_sae": (layer, sae_splice(zero_dec)), "noisy": (layer, sae_splice(noisy)),
               "noisy2": (2, sae_splice(noisy)), "zero2": (2, zero_splice)}
    res = downstream_losses(model, text, splices, chunk=7, progress=False)
    assert res.n_predictions == sum(len(s) - 2 for s in seqs)
    per_doc = [sum(len(s) - 2 for s in seqs[i:i + 2]) for i in range(0, 6, 2)]
    assert res.n_D.tolist() == per_doc  # predictions are counted towards their documents

    def kl(key: str) -> float:
        return float(res.kl[key].sum() / res.n_D.sum())

    clean_nll, clean_lp = _reference(model, seqs, None, None)
    assert res.nll_clean_D.sum() / res.n_D.sum() == pytest.approx(float(clean_nll.mean()), rel=CE_TOLERANCE[dtype])
    for key, lay, fn in (("zero", layer, torch.zeros_like), ("noisy", layer, lambda h: noisy(h)[0]),
                         ("noisy2", 2, lambda h: noisy(h)[0]), ("zero2", 2, torch.zeros_like)):
        nll, lp = _reference(model, seqs, lay, fn)
        want_kl = (clean_lp.exp() * (clean_lp - lp)).sum(dim=1)
        assert res.ce(key) == pytest.approx(float(nll.mean()), rel=CE_TOLERANCE[dtype]), key
        assert kl(key) == pytest.approx(float(want_kl.mean()), rel=KL_TOLERANCE[dtype], abs=1e-6), key
    assert abs(res.ce("zero") - float(clean_nll.mean())) > 0.01 and kl("zero") > 0.01  # the test is not vacuous

    perfect_m = downstream_figures(res, "perfect", "zero", "zero")
    assert perfect_m["ce_score"].value == pytest.approx(1.0, abs=1e-4)
    assert perfect_m["kl_score"].value == pytest.approx(1.0, abs=1e-4)
    zero_m = downstream_figures(res, "zero_sae", "zero", "zero")
    assert zero_m["ce_score"].value == pytest.approx(0.0, abs=1e-6)
    assert zero_m["kl_score"].value == pytest.approx(0.0, abs=1e-6)
    noisy_m = downstream_figures(res, "noisy", "zero", "zero")
    want = (res.ce("zero") - res.ce("noisy")) / (res.ce("zero") - float(clean_nll.mean()))
    assert noisy_m["ce_score"].value == pytest.approx(want, rel=1e-3)


def test_saelens_convention_equals_an_independent_computation(tiny_gemma2: Path, dtype: str) -> None:
    """SAELens' get_recons_loss inside run_evals with the special tokens ignored: the SAE at text positions,
    the zero-ablation at every position (BOS too), CE and KL over predictions from text positions. Written
    out here with full forwards and hooks; csae's own convention (zero-ablation at text positions) differs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2, dtype=getattr(torch, dtype)).eval()
    seqs = _seqs(model.config.vocab_size, seed=1)
    layer, sae = 1, random_sae(model.config.hidden_size, 4 * model.config.hidden_size, seed=3, bias=-0.05)
    splices = {"zero": (layer, zero_splice), "zero_all": (layer, zero_all_splice), "sae": (layer, sae_splice(sae))}
    res = downstream_losses(model, batches(_pieces(seqs), 4, pad_id=0, has_bos=True), splices, chunk=5,
                            progress=False)
    figs = downstream_figures(res, "sae", "zero", "zero_all")

    clean_nll, clean_lp = _reference(model, seqs, None, None)
    sae_nll, sae_lp = _reference(model, seqs, layer, lambda h: sae(h)[0], first=1)  # BOS kept
    zero_all_nll, zero_all_lp = _reference(model, seqs, layer, torch.zeros_like, first=0)  # BOS zeroed too
    zero_nll, _ = _reference(model, seqs, layer, torch.zeros_like, first=1)

    def kl(lp: torch.Tensor) -> float:
        return float((clean_lp.exp() * (clean_lp - lp)).sum(dim=1).mean())

    c, s_, z, za = (float(x.mean()) for x in (clean_nll, sae_nll, zero_nll, zero_all_nll))
    for key, want in (("sae", s_), ("zero", z), ("zero_all", za)):
        assert res.ce(key) == pytest.approx(want, rel=CE_TOLERANCE[dtype]), key
    assert abs(za - z) > 10 * CE_TOLERANCE[dtype] * z  # zeroing BOS changes the reference: the conventions differ

    def tol(ref: float) -> float:
        """A score (ref - s) / (ref - c) of CE means each within CE_TOLERANCE (relative): numerator and
        denominator each move by up to two of those errors, relative to the CE gap ref - c."""
        return 4 * CE_TOLERANCE[dtype] * max(ref, s_, c) / (ref - c)

    assert figs["ce_score_saelens"].value == pytest.approx((za - s_) / (za - c), abs=tol(za))
    assert figs["ce_score"].value == pytest.approx((z - s_) / (z - c), abs=tol(z))
    assert figs["kl_score_saelens"].value == pytest.approx((kl(zero_all_lp) - kl(sae_lp)) / kl(zero_all_lp),
                                                           rel=3 * KL_TOLERANCE[dtype], abs=1e-4)


def _capped(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


#: head_logits with a real mistake: the soft-cap left out, or applied twice.
MISTAKES = {
    "no_softcap": lambda model, h: model.get_output_embeddings()(h.to(model.dtype)).float(),
    "softcap_twice": lambda model, h: _capped(_capped(model.get_output_embeddings()(h.to(model.dtype)).float(),
                                                      model.config.final_logit_softcapping),
                                              model.config.final_logit_softcapping),
}


@pytest.mark.parametrize("mistake", [None, *MISTAKES])
def test_check_head_catches_a_wrong_head_but_not_rounding(tiny_gemma2: Path, dtype: str, mistake: str | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2, dtype=getattr(torch, dtype)).eval()
    # A soft-cap that bends this model's largest logits (~0.6) by ~6%, as Gemma-2's cap of 30 bends its
    # logits: leaving it out must be caught in bfloat16 too, whose tolerance is 8 u = 3%.
    model.config.final_logit_softcapping = 1.5
    (batch,) = batches(_pieces(_seqs(model.config.vocab_size)), 8, pad_id=0, has_bos=True)
    if mistake is None:
        check_head(model, batch)  # rounding alone (the model caps in its own dtype) passes
        return
    monkeypatch.setattr(lm, "head_logits", MISTAKES[mistake])
    with pytest.raises(RuntimeError, match="disagrees with the model's own forward"):
        check_head(model, batch)


def test_restart_from_the_clean_residual_reproduces_the_model(tiny_gemma3: Path, dtype: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=getattr(torch, dtype)).eval()
    (batch,) = batches(_pieces(_seqs(model.config.vocab_size)), 8, pad_id=0, has_bos=True)
    clean = clean_pass(model, batch, [0, 2])
    restart = Restart(model, clean.tuple_out)
    for layer in (0, 2):
        restart.verify(batch, clean, layer)
        assert restart.mode == "skip"
        got = restart(batch.ids_BT, layer, clean.resid[layer])
        # the same operations on the same values as the clean forward (see evaluate.lm.RESTART_ROUNDINGS)
        torch.testing.assert_close(got[batch.text_BT], clean.final_BTD[batch.text_BT], rtol=0, atol=0)
    # The stubs are gone afterwards: a normal forward still works and matches.
    again = clean_pass(model, batch, [2])
    torch.testing.assert_close(again.final_BTD, clean.final_BTD)


def test_build_sequences_counts_predictions_exactly(tiny_gemma3: Path, topic_corpus: Path) -> None:
    from transformers import AutoTokenizer

    from csae.shared.lm.corpora import iter_documents

    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    docs = list(iter_documents(str(topic_corpus), "heldout", 0.5))
    seqs = build_sequences(docs, tok, context=10, budget=100)
    assert all(s.ids[0] == tok.bos_token_id and 3 <= len(s.ids) <= 10 for s in seqs)
    assert sum(len(s.ids) - 2 for s in seqs) == 100
    (b, *_) = batches(seqs, 64, 0, True)
    assert isinstance(b, TextBatch) and b.n_predictions == 100
    seqs_t = build_sequences(docs, tok, context=10, budget=55, unit="tokens")
    assert sum(len(s.ids) - 1 for s in seqs_t) == 55
    # at most `per_doc` predictions from one document, taken from its start, documents numbered in order
    capped = build_sequences(docs, tok, context=10, budget=100, per_doc=4)
    per_doc: dict[int, int] = {}
    for s in capped:
        per_doc[s.doc] = per_doc.get(s.doc, 0) + len(s.ids) - 2
    assert sum(per_doc.values()) == 100 and max(per_doc.values()) == 4
    assert sorted(per_doc) == list(range(len(per_doc))) and len(per_doc) == 25
    first = tok(docs[0].text, add_special_tokens=False)["input_ids"]
    assert capped[0].ids == [tok.bos_token_id, *first[:5]]


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_gemma2"])
def test_blocked_token_stats_equal_the_full_log_softmax(fixture: str, request: pytest.FixtureRequest,
                                                        dtype: str) -> None:
    """The walk over vocabulary blocks (here 7 entries a block, the last one shorter) against the full logits'
    float64 log-softmax: log p(target), KL from the reference set, and the argmax where the top two logits
    are further apart than the head's rounding (a closer pair may tie in bfloat16)."""
    from csae.evaluate.lm.vocab import token_stats

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=getattr(torch, dtype)).eval()
    if fixture == "tiny_gemma2":
        model.config.final_logit_softcapping = 1.5  # a cap that bends this model's logits (see above)
    gen = torch.Generator().manual_seed(0)
    d, vocab = model.config.hidden_size, model.config.vocab_size
    assert vocab % 7
    base = 1.0 if fixture == "tiny_gemma2" else 4.0  # below the cap's saturation, where bfloat16 logits tie
    hs = [torch.randn(23, d, generator=gen) * base * scale for scale in (1.0, 1.5, 3.0)]
    targets = torch.randint(0, vocab, (23,), generator=gen)
    targets[:12] = lm.head_logits(model, hs[0][:12]).argmax(dim=1)  # right for the first set
    got = token_stats(model, targets, hs, chunk=10, reference=1, block=7)
    logits = [lm.head_logits(model, h).double() for h in hs]
    lps = [torch.log_softmax(x, dim=1) for x in logits]
    for st, lp, x in zip(got, lps, logits, strict=True):
        torch.testing.assert_close(st.logp_N.double(), lp.gather(1, targets.unsqueeze(1)).squeeze(1),
                                   rtol=CE_TOLERANCE[dtype], atol=CE_TOLERANCE[dtype])
        want_kl = (lps[1].exp() * (lps[1] - lp)).sum(dim=1)
        torch.testing.assert_close(st.kl_N.double(), want_kl, rtol=KL_TOLERANCE[dtype], atol=1e-6)  # type: ignore
        top2 = x.topk(2, dim=1).values
        clear = top2[:, 0] - top2[:, 1] > 4 * torch.finfo(getattr(torch, dtype)).eps * x.abs().max(dim=1).values
        assert clear.sum() >= 3
        assert torch.equal(st.correct_N[clear], (lp.argmax(dim=1) == targets)[clear])
    assert got[0].correct_N[:12].sum() >= 10
    assert (got[1].kl_N == 0).all() and (got[0].kl_N > 1e-3).all()  # type: ignore[union-attr]
