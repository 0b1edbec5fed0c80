"""The unlearning protocol on a tiny Gemma 3 with a planted forget-topic feature: it is chosen on the selection
split, U is near 1 on the test split and equals an independent computation with full forwards and a clamping
hook; the matched random control scores about zero and only ever draws features that fire on forget text.
And the exact top-1 shortcut against the full LM head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_eval import FORGET, identity_sae
from transformers import AutoModelForCausalLM, AutoTokenizer

from csae.evaluate.families.unlearning.protocol import unlearning
from csae.evaluate.inputs import LayerCheckpoint
from csae.evaluate.lm.passes import head_logits, still_top1, top1_reference
from csae.evaluate.lm.text import TextSource
from csae.evaluate.lm.vocab import token_stats
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.train import TrainConfig
from csae.shared.lm.corpora import iter_documents
from csae.shared.lm.models import LoadedModel, blocks
from csae.shared.sae.autoencoder import SAE
from csae.shared.sae.checkpoint import LayerInfo

LAYER = 1
N_DEAD, N_NUISANCE = 1000, 32
#: Known forget tokens whose correctness may differ from the reference hook's. float32: none (measured: none).
#: bfloat16: the hook adds the clamp's change to h in bfloat16 where csae forms err + decode(f') in float32
#: and rounds once, so a residual can differ by one bfloat16 ulp, which flips a prediction only where the top
#: two logits lie within that rounding of each other: 2 of the ~100 known tokens (measured here: none).
FLIPS = {"float32": 0, "bfloat16": 2}


def _docs(corpus: Path, topic: str | None = None) -> list[Any]:
    return [d for d in iter_documents(str(corpus), "heldout", 0.5) if topic is None or d.topic == topic]


def _ids(tok: Any, text: str) -> list[int]:
    return [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]


def _resid(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]


def planted_sae(model: Any, tok: Any, corpus: Path) -> tuple[SAE, int, range]:
    """Identity features (fire on about half the tokens, everywhere) + one feature fitted by least squares to
    fire exactly on forget-topic tokens + nuisance features that fire on every token with a tiny activation
    (so clamping them changes almost nothing: the matched control's pool) + dead features.
    Returns (sae, planted index, nuisance indices)."""
    xs, ys = [], []
    for doc in _docs(corpus):
        x = _resid(model, _ids(tok, doc.text))[1:]
        xs.append(x)
        ys.append(torch.full((len(x),), 1.0 if doc.topic == FORGET else -1.0))
    x, y = torch.cat(xs), torch.cat(ys)
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    sol = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution.squeeze(1).float()
    margin = design.float() @ sol
    assert ((margin > 0.5) == (y > 0)).all(), "the planted direction does not separate the topics"
    d = x.shape[1]
    base = identity_sae(d)
    planted, nuisance = 2 * d, range(2 * d + 1, 2 * d + 1 + N_NUISANCE)
    sae = SAE(d, 2 * d + 1 + N_NUISANCE + N_DEAD)
    k = float(x.norm(dim=1).mean())  # activation about the residual's norm
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, : 2 * d] = base.W_enc
        sae.W_enc[:, planted] = k * sol[:d]
        sae.b_enc.fill_(-1e4)  # dead
        sae.b_enc[: 2 * d] = 0
        sae.b_enc[planted] = k * sol[d]
        sae.b_enc[nuisance] = 1e-3  # W_enc column 0: always 1e-3
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(sae.d_sae, d, generator=gen), dim=1))
        sae.W_dec[: 2 * d] = base.W_dec
        sae.b_dec.zero_()
    return sae, planted, nuisance


def test_planted_topic_feature_is_chosen_and_scores_on_the_test_split(tiny_gemma3: Path,
                                                                        topic_corpus: Path, dtype: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=getattr(torch, dtype)).eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    sae, planted, nuisance = planted_sae(model, tok, topic_corpus)
    info = LayerInfo(config=TrainConfig(), seed=0, layer=LAYER, store="", model={}, scale=1.0, d_in=sae.d_in,
                     d_sae=sae.d_sae, train_rows=0)
    ckpt = LayerCheckpoint("planted", 0, LAYER, Path("."), sae, None, info)
    cfg = EvalConfig(select_tokens=10**6, sweep_predictions=10**6, unlearn_known=10**6, ce_tokens=0, lm_batch_size=4,
                     random_draws=5)
    lm = LoadedModel(model=model, tokenizer=tok, identity={})
    found = unlearning(lm, [ckpt], TextSource(str(topic_corpus), 0.5, 33), cfg, progress=False)
    assert found is not None
    family, points = found
    figs, extras, pts = family.figures[ckpt.key], family.extras[ckpt.key], points[ckpt.key]

    assert extras["unlearn_forget_known"] > 50 and extras["unlearn_retain_known"] > 50
    assert family.units.strata == (extras["unlearn_forget_docs"], extras["unlearn_retain_docs"])
    assert pts["chosen"]["features"] == [planted]  # the only feature with retain rate 0 that fires on forget text
    assert figs["unlearn_U"].value > 0.5 and figs["unlearn_U_CE"].value > 0.1
    assert figs["unlearn_A_retain"].value == 1.0  # the feature never fires on retain text
    assert figs["unlearn_U_random"].value == pytest.approx(0.0, abs=0.02)
    assert figs["unlearn_U_minus_random"].value > 0.5
    drawn = pts["test"]["random_features"]
    assert len(drawn) == 5 and all(len(f) == 1 and f[0] in nuisance for f in drawn)  # matched: rate ~1, fires

    # Independent A_forget at the chosen setting on the test split: full forwards, a hook applying the clamp.
    c = pts["chosen"]["c"]
    forget_sel, forget_test = _docs(topic_corpus, FORGET)[0::2], _docs(topic_corpus, FORGET)[1::2]
    with torch.no_grad():
        f_sel = torch.cat([sae.encode(_resid(model, _ids(tok, doc.text))[1:]) for doc in forget_sel])[:, planted]
    a = float(f_sel[f_sel > 0].mean())
    direction = sae.W_dec[planted]

    def hook(_m: Any, _i: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        f = sae.encode(h[0, 1:])[:, planted]
        new = h.clone()
        new[0, 1:] += torch.where(f > 0, -c * a - f, torch.zeros_like(f)).unsqueeze(1) * direction
        return (new, *out[1:]) if isinstance(out, tuple) else new

    kept = known = 0
    for doc in forget_test:
        ids = _ids(tok, doc.text)
        targets = torch.tensor(ids[2:])
        with torch.no_grad():
            clean = model(input_ids=torch.tensor([ids])).logits[0, 1:-1].argmax(-1) == targets
            handle = blocks(model)[LAYER].register_forward_hook(hook)
            after = model(input_ids=torch.tensor([ids])).logits[0, 1:-1].argmax(-1) == targets
            handle.remove()
        known += int(clean.sum())
        kept += int((clean & after).sum())
    assert known == extras["unlearn_forget_known"]
    assert 1 - figs["unlearn_U"].value == pytest.approx(kept / known, abs=FLIPS[dtype] / known)


@pytest.mark.parametrize("fixture", ["tiny_gemma3", "tiny_gemma2"])
def test_top1_shortcut_equals_the_full_head(fixture: str, request: pytest.FixtureRequest, dtype: str) -> None:
    """For known positions and final states moved by small to large changes, `still_top1` gives exactly
    `head_logits(h).argmax() == target`, and the small changes are decided without the full head. Candidates
    are limited to 8 so that the bound, not the candidate list, has to do the work on a small vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=getattr(torch, dtype)).eval()
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(600, d, generator=gen) * 3
    if dtype == "bfloat16":
        h = h.bfloat16().float()  # a model in bfloat16 hands back bfloat16 states
    logits = head_logits(model, h)
    targets = logits.argmax(dim=1)  # every position known
    (st,) = token_stats(model, targets, [h], chunk=128, topk=9)
    assert st.correct_N.all()
    ref = top1_reference(model, h, targets, st.top_NK)
    decided_without_head = 0
    for scale in (1e-3, 1e-2, 0.1, 0.5, 2.0):
        h_new = h + scale * torch.randn(h.shape, generator=gen) * h.norm(dim=1, keepdim=True) / d**0.5
        if dtype == "bfloat16":
            h_new = h_new.bfloat16().float()
        got, used = still_top1(model, ref, h_new, chunk=128)
        want = head_logits(model, h_new).argmax(dim=1) == targets
        assert torch.equal(got, want), (scale, int((got != want).sum()))
        decided_without_head += len(h) - used
        if scale == 1e-3:
            assert used < len(h) // 2, used  # the bound decides most small changes
    assert 0 < int((~want).sum()) < len(h)  # the large changes flip some predictions: not vacuous
    assert decided_without_head > len(h)


@pytest.mark.parametrize("target", [1, 20, 45])
def test_test_text_stops_at_the_document_that_reaches_unlearn_known(tiny_gemma3: Path,
                                                                     topic_corpus: Path, target: int) -> None:
    """Whole documents in order, up to the first one with which the known tokens reach unlearn_known: known
    tokens counted here by a direct forward of each sequence alone (float32: the rule, not the rounding, is
    under test; the batched passes agree with single ones to the last bit there)."""
    from csae.evaluate.families.unlearning.protocol import _known_text
    from csae.evaluate.lm.text import build_sequences

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    docs = _docs(topic_corpus)
    src = TextSource(str(topic_corpus), 0.5, 33)
    cfg = EvalConfig(unlearn_known=target, lm_batch_size=2)  # windows of 4 sequences: the stop falls inside one
    per_doc: dict[int, int] = {}
    for piece in build_sequences(docs, tok, src.context, 2**62):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([piece.ids])).logits[0]
        ids = torch.tensor(piece.ids)
        per_doc[piece.doc] = per_doc.get(piece.doc, 0) + int((logits[1:-1].argmax(dim=1) == ids[2:]).sum())
    cumulative = torch.tensor([per_doc[d] for d in range(len(per_doc))]).cumsum(0)
    assert cumulative[-1] >= target, "the fixture corpus must hold enough known tokens"
    want_docs = int((cumulative < target).sum()) + 1

    text = _known_text(LoadedModel(model=model, tokenizer=tok, identity={}), docs, src, cfg, [LAYER])
    assert text.n_docs == want_docs
    assert text.n_known == int(cumulative[want_docs - 1]) >= target
