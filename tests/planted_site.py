"""A browser site with a planted feature, and a reader of the site's data files.

The planted store: the tiny Gemma 3's word tokens as token ids, and on every row whose token is "gene" a large
added direction u. Feature 0 of the csae run reads u with a threshold above every other row's projection, so
it fires exactly on "gene"; its decoder direction is set to W_U["brain"] / g (g the final norm's gain), so its
logit effect W_U (g * d) is led by "brain".
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from click.testing import CliRunner
from tiny_eval import D_MODEL, make_store, random_sae, write_checkpoint

from csae.evaluate.cli import main
from csae.shared.sae.autoencoder import SAE
from csae.shared.store.schema import bf16_to_bits, bits_to_bf16

PLANTED_WORD, RAISED_WORD, LAYER = "gene", "brain", 1
#: The tsae run's high-level block: its features [0, HIGH_LEVEL).
HIGH_LEVEL = 6
RUNS = ("csae", "tsae", "baseline")
#: The features sparse probing chose per topic for the csae run (probing.json beside the browser's --results).
PROBES = {"History": [0, 7, 3], "Arts": [12]}
#: Arrays of the data files, by the typed array the page decodes them into.
TYPES = {"fires": "<i4", "max": "<f4", "topics": "<i4", "hist": "<i4", "top_rows": "<i4", "top_val": "<f4",
         "top_win": "u1", "sample_rows": "<i4", "sample_val": "<f4", "sample_win": "u1", "up_ids": "<i4",
         "up": "<f4", "down_ids": "<i4", "down": "<f4", "nb_ids": "<i4", "nb_cos": "<f4", "ids": "<i4", "cos": "<f4",
         "token": "<i4", "seq": "<i4", "doc": "<i4"}


def _decoded(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: (np.frombuffer(base64.b64decode(v), TYPES[k]) if k in TYPES and isinstance(v, str)
                else _decoded(v) if isinstance(v, dict) and k != "vocab" else v) for k, v in obj.items()}


def read_data(out: Path, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(common.js, the dictionary's data file), arrays decoded, as the page reads them."""
    def payload(path: Path) -> dict[str, Any]:
        text = path.read_text()
        return json.loads(text[text.index("{"): text.rindex("}") + 1])

    common = _decoded(payload(out / "data" / "common.js"))
    entry = next(d for d in common["dictionaries"] if d["key"] == key)
    return common, _decoded(payload(out / entry["file"]))


def plant(store_path: Path, model_dir: Path, seed: int = 0) -> tuple[int, torch.Tensor, float]:
    """Word token ids on every row, u added on the planted word's rows; returns (token id, u, threshold)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    planted = tok.convert_tokens_to_ids(PLANTED_WORD)
    group = zarr.open_group(str(store_path), mode="r+")
    n = group["tokens/token_id"].shape[0]
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, len(tok), n)
    group["tokens/token_id"][:] = ids.astype(np.int32)
    arr = group[f"resid_post/{LAYER}"]
    x = bits_to_bf16(arr[:]).float()
    u = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal(D_MODEL)).float(), dim=0)
    proj = x @ u
    threshold = float(proj.abs().max()) + 5.0
    hit = torch.from_numpy(ids == planted)
    x[hit] += (2 * threshold + 10.0) * u  # planted rows project above 2 threshold + 10 - |proj| > threshold + 15
    arr[:] = bf16_to_bits(x.to(torch.bfloat16))
    return planted, u, threshold


def model_ranking(model_dir: Path, direction: torch.Tensor, dtype: str) -> list[int]:
    """Token ids by the model's own logits of its final norm applied to `direction` (an independent route to the
    ranking W_U (g * d) gives: an RMS norm only rescales its input)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        h = model.model.norm(direction.to(model.dtype).unsqueeze(0))
        logits = model.lm_head(h)[0].float()
    return logits.argsort(descending=True).tolist()


def build_planted_site(tmp: Path, tiny_gemma3: Path, topic_corpus: Path, dtype: str) -> dict[str, Any]:
    """`evaluate browse` of a csae run (feature 0 planted), a tsae run (a jumprelu SAE with a high-level block of
    HIGH_LEVEL features) and a baseline run, all at layer 1, in `tmp`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = tmp / "acts.zarr"
    make_store(store, tiny_gemma3, topic_corpus)
    planted, u, threshold = plant(store, tiny_gemma3)
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    raised = tok.convert_tokens_to_ids(RAISED_WORD)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3)
    with torch.no_grad():
        gain = model.model.norm(torch.ones(1, D_MODEL))[0]
        d = torch.nn.functional.normalize(model.lm_head.weight[raised] / gain, dim=0)
    sae = random_sae(D_MODEL, 32, seed=1, bias=-0.5)
    with torch.no_grad():
        sae.W_enc[:, 0] = u
        sae.b_enc[0] = -threshold
        sae.W_dec[0] = d
    write_checkpoint(tmp / "csae", LAYER, sae)
    tsae = SAE(D_MODEL, 32, activation="jumprelu", high_level=HIGH_LEVEL)
    tsae.load_state_dict({**random_sae(D_MODEL, 32, seed=3, bias=-0.5).state_dict(), "threshold": torch.zeros(32)})
    write_checkpoint(tmp / "tsae", LAYER, tsae)
    write_checkpoint(tmp / "baseline", LAYER, random_sae(D_MODEL, 32, seed=2, bias=-0.5))
    out, results = tmp / "site", tmp / "eval"
    results.mkdir()  # what `evaluate run` leaves for the browser: the features sparse probing chose per topic
    (results / "probing.json").write_text(json.dumps({f"csae/seed_0/layer_{LAYER}": PROBES}))
    (results / "comparison.json").write_text(json.dumps({"reference": "baseline", "method": {}}))  # no verdicts
    result = CliRunner().invoke(main, ["browse", "--no-progress", "--store", str(store), "--checkpoints",
                                       *(str(tmp / r) for r in RUNS), "--out", str(out), "--dtype", dtype,
                                       "--results", str(results)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"out": out, "checkpoints": tmp, "planted_token": planted, "planted_word": PLANTED_WORD,
            "raised_token": raised, "model_ranking": model_ranking(tiny_gemma3, d, dtype), "dtype": dtype}
