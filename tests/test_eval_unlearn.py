"""The unlearning protocol on a tiny Gemma 3 with a planted forget-topic feature: it is selected, the
score is positive, random features score about zero, and a sweep point's A_forget equals an independent
computation with full forwards and a clamping hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from eval_fixtures import FORGET, identity_sae, tiny_gemma3, topic_corpus  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from csae.evaluate.checkpoints import LayerCheckpoint
from csae.evaluate.lm_metrics import TextSource, unlearning_metrics
from csae.shared.checkpoint import LayerInfo
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.train import TrainConfig
from csae.shared.corpora import iter_documents
from csae.shared.models import LoadedModel, blocks
from csae.shared.sae import SAE

LAYER = 1
N_DEAD = 4000
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


def planted_sae(model: Any, tok: Any, corpus: Path) -> tuple[SAE, int]:
    """Identity features (fire everywhere) + one feature fitted by least squares to fire exactly on
    forget-topic tokens + many dead features (candidates for the random control). Returns (sae, planted)."""
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
    sae = SAE(d, 2 * d + 1 + N_DEAD)
    k = float(x.norm(dim=1).mean())  # activation about the residual's norm
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, : 2 * d] = base.W_enc
        sae.W_enc[:, 2 * d] = k * sol[:d]
        sae.b_enc.fill_(-1e4)  # dead
        sae.b_enc[: 2 * d] = 0
        sae.b_enc[2 * d] = k * sol[d]
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(sae.d_sae, d, generator=gen), dim=1))
        sae.W_dec[: 2 * d] = base.W_dec
        sae.b_dec.zero_()
    return sae, 2 * d


def test_planted_topic_feature_is_selected_and_scores(tiny_gemma3: Path, topic_corpus: Path,  # noqa: F811
                                                      dtype: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=getattr(torch, dtype)).eval()
    model.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    sae, planted = planted_sae(model, tok, topic_corpus)
    info = LayerInfo(config=TrainConfig(), seed=0, layer=LAYER, store="", model={}, scale=1.0, d_in=sae.d_in,
                     d_sae=sae.d_sae, train_rows=0)
    ckpt = LayerCheckpoint("planted", 0, LAYER, Path("."), sae, None, info)
    cfg = EvalConfig(select_tokens=10**6, unlearn_tokens=10**6, ce_tokens=0, lm_batch_size=4)
    lm = LoadedModel(model=model, tokenizer=tok, identity={})
    metrics, points = unlearning_metrics(lm, [ckpt], TextSource(str(topic_corpus), 0.5, 33), cfg, progress=False)
    m, pts = metrics[ckpt.key], points[ckpt.key]

    assert m["unlearn_forget_known"] > 50 and m["unlearn_retain_known"] > 50
    assert all(p["features"][0] == planted for p in pts["selected"])  # highest nu_forget, nu_retain = 0
    assert all(planted not in p["features"] for p in pts["random"])
    assert m["unlearn_U"] > 0.5
    assert m["unlearn_U_CE"] > 0.1
    assert m["unlearn_U_random"] == pytest.approx(0.0, abs=0.02)
    assert m["unlearn_U_minus_random"] > 0.5
    assert all(p["A_retain"] == 1.0 for p in pts["selected"])  # the feature never fires on retain text

    # Independent A_forget for one point: full forwards with a hook applying the clamp formula.
    point = next(p for p in pts["selected"] if p["c"] == 5.0 and p["n"] == 10 and p["retain_threshold"] == 0.01)
    forget_eval = _docs(topic_corpus, FORGET)[1::2]
    sel_docs = _docs(topic_corpus, FORGET)[0::2]
    with torch.no_grad():
        f_sel = torch.cat([sae.encode(_resid(model, _ids(tok, doc.text))[1:]) for doc in sel_docs])[:, planted]
    a = float(f_sel[f_sel > 0].mean())
    direction = sae.W_dec[planted]

    def hook(_m: Any, _i: Any, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        f = sae.encode(h[0, 1:])[:, planted]
        new = h.clone()
        new[0, 1:] += torch.where(f > 0, -5.0 * a - f, torch.zeros_like(f)).unsqueeze(1) * direction
        return (new, *out[1:]) if isinstance(out, tuple) else new

    kept = known = 0
    for doc in forget_eval:
        ids = _ids(tok, doc.text)
        targets = torch.tensor(ids[2:])
        with torch.no_grad():
            clean = model(input_ids=torch.tensor([ids])).logits[0, 1:-1].argmax(-1) == targets
            handle = blocks(model)[LAYER].register_forward_hook(hook)
            after = model(input_ids=torch.tensor([ids])).logits[0, 1:-1].argmax(-1) == targets
            handle.remove()
        known += int(clean.sum())
        kept += int((clean & after).sum())
    assert known == m["unlearn_forget_known"]
    assert point["A_forget"] == pytest.approx(kept / known, abs=FLIPS[dtype] / known)
