"""`evaluate browse`: check the inputs, collect every dictionary, compute its decoder geometry, write the site.

Everything is checked before anything is written, and the site is built in a temporary directory beside
`out` that replaces `out` only when complete: bad input or a crash leaves `out` as it was.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csae.evaluate.browse.collect import Rows, choose_rows, collect
from csae.evaluate.browse.logits import best_match, logit_effects, nearest, norm_gain
from csae.evaluate.browse.site import (
    DATA,
    FRONTIER_PNG,
    PROBES_JSON,
    Dictionary,
    answer_payload,
    b64,
    data_file,
    shown_tokens,
    write_site,
)
from csae.evaluate.inputs import LayerCheckpoint, load_run
from csae.evaluate.lm.passes import load_lm
from csae.shared.config.base import to_dict
from csae.shared.config.browse import BrowseConfig
from csae.shared.device import resolve_device, resolve_dtype
from csae.shared.errors import UserError
from csae.shared.files import staged_outputs
from csae.shared.lm.models import LoadedModel
from csae.shared.store.schema import ActivationStore

log = logging.getLogger(__name__)

LOGIT_NOTE = ("Logit effect: W_U (g * d), d the feature's unit decoder direction, g the final norm's elementwise "
              "gain, W_U the unembedding: how the feature's direction, written into the final residual, moves "
              "each token's logit (per unit of norm input; the norm's per-token scale, the blocks after the layer "
              "and the logit soft-cap are left out). Ranked among {vocab}.")


@dataclass
class Built:
    index: Path
    bytes: int
    seconds: float
    dictionaries: list[str]


def checkpoints(store: ActivationStore, store_path: str, dirs: list[Path], seed: int) -> list[LayerCheckpoint]:
    """Seed `seed`'s SAEs of every run (checked against the store by evaluate's reader)."""
    ckpts: list[LayerCheckpoint] = []
    for directory in dirs:
        run = [c for c in load_run(Path(directory), store, store_path) if c.seed == seed]
        if not run:
            raise UserError(f"{directory} has no SAEs of seed {seed} (no seed_{seed}/layer_<L>/); pass --seed with "
                            f"a seed it was trained with")
        ckpts += run
    names = [c.key for c in ckpts]
    if len(set(names)) != len(names):
        raise UserError("two checkpoint directories have the same name; runs are named by their directory, so give "
                        "them different directory names")
    return ckpts


def check_tokens(rows: Rows, store_path: str) -> None:
    """The browser shows text: every row read needs its token id (harvest writes them; -1 means never written)."""
    if rows.n == 0 or (rows.token_N < 0).any() or (rows.seq_N < 0).any():
        raise UserError(f"store {store_path} has no token metadata (token ids, sequences) for the rows the browser "
                        f"reads; the browser needs the text of every row: harvest the store with `harvest run`")


def token_strings(tokenizer: Any, ids: np.ndarray) -> dict[str, str]:
    texts = tokenizer.batch_decode([[int(i)] for i in ids], clean_up_tokenization_spaces=False)
    return {str(int(i)): t for i, t in zip(ids, texts, strict=True)}


def geometry(ckpts: list[LayerCheckpoint], lm: LoadedModel, cfg: BrowseConfig, dtype: torch.dtype,
             rows: Rows) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    """Per checkpoint key: (logit effects, nearest features, best matches in the other runs of its layer)."""
    gain = norm_gain(lm.model)
    w_u = lm.model.get_output_embeddings().weight.detach()
    vocab = None
    if cfg.logit_vocabulary == "store":
        vocab = torch.from_numpy(np.unique(rows.token_N).astype(np.int64))
        w_u = w_u[vocab.to(w_u.device)]
    out = {}
    for c in ckpts:
        others = {o.series: best_match(c.sae.W_dec, o.sae.W_dec) for o in ckpts
                  if (o.layer, o.point) == (c.layer, c.point) and o.run != c.run}
        effects = logit_effects(c.sae.W_dec, gain, w_u, min(cfg.logit_tokens, len(w_u)), dtype)
        if vocab is not None:  # positions in the store's tokens -> token ids
            effects = replace(effects, up_ids_FK=vocab[effects.up_ids_FK], down_ids_FK=vocab[effects.down_ids_FK])
        out[c.key] = (effects, nearest(c.sae.W_dec, cfg.neighbours), others)
    return out


def read_probes(results: Path | None) -> dict[str, dict[str, list[int]]]:
    """probing.json of `evaluate run --out RESULTS`: {checkpoint key: {topic: features}} ({} without one)."""
    path = None if results is None else Path(results) / PROBES_JSON
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); re-run `evaluate run`, or leave --results out") from None


#: What `evaluate browse` writes into its --out (name patterns); anything else there is left as it is.
SITE = ("index.html", "browser.js", "browser.css", FRONTIER_PNG, DATA)


def build(cfg: BrowseConfig, store_path: str, checkpoint_dirs: list[Path], out: Path, *, cache_dir: Path,
          progress: bool = True, lm: LoadedModel | None = None, results: Path | None = None) -> Built:
    """The browser of every SAE of seed cfg.seed, built under `out`'s writer lock beside the old one, which it
    replaces when complete; with `results` (an `evaluate run --out`), its start page shows the frontier and the
    matched-L0 verdicts."""
    answer = answer_payload(results)  # before the work: a bad --results fails fast
    out = Path(out)
    with staged_outputs(out, SITE, command="evaluate browse") as new:
        built = _build(cfg, store_path, checkpoint_dirs, new, cache_dir=cache_dir, progress=progress, lm=lm,
                       results=results, answer=answer)
    return replace(built, index=out / "index.html")


def _build(cfg: BrowseConfig, store_path: str, checkpoint_dirs: list[Path], out: Path, *, cache_dir: Path,
           progress: bool, lm: LoadedModel | None, results: Path | None, answer: dict | None) -> Built:
    t0 = time.perf_counter()
    chosen = read_probes(results)
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))
    dtype, device = getattr(torch, cfg.dtype), resolve_device(cfg.device)
    store = ActivationStore.open(store_path)
    ckpts = checkpoints(store, str(store_path), checkpoint_dirs, cfg.seed)
    fractions = {c.info.config.heldout_tail_fraction for c in ckpts}
    rows = choose_rows(store, store.heldout_start(max(fractions)), cfg.rows)
    check_tokens(rows, str(store_path))
    t1 = time.perf_counter()
    lm = lm or load_lm(store, cache_dir, model=cfg.model, dtype=cfg.dtype, device=cfg.device)
    topic_D = store.docs("topic").astype(np.int64) if "docs/topic" in store.group and store.topics else None
    t2 = time.perf_counter()
    geo = geometry(ckpts, lm, cfg, dtype, rows)
    log.info("browse: model loaded in %.1f s, logit effects and neighbours in %.1f s (%s)", t2 - t1,
             time.perf_counter() - t2, cfg.dtype)
    dicts = []
    bar = tqdm(total=rows.n * len(ckpts), unit="row", unit_scale=True, desc="browse: encoding", disable=not progress)
    for c in ckpts:
        collected = collect(store, c.layer, c.sae, rows, topic_D, len(store.topics), cfg, dtype, device, bar)
        effects, nb, matches = geo[c.key]
        dicts.append(Dictionary(c.series, c.layer, collected, effects, nb, matches, chosen.get(c.key),
                                c.sae.high_level))
    bar.close()
    t3 = time.perf_counter()
    common = {**common_payload(store, str(store_path), rows, dicts, lm, cfg, checkpoint_dirs), "answer": answer}
    written = write_site(out, common, dicts, results)
    size = sum(p.stat().st_size for p in written)
    log.info("browse: token strings and site written in %.1f s", time.perf_counter() - t3)
    return Built(out / "index.html", size, time.perf_counter() - t0, [d.key for d in dicts])


def common_payload(store: ActivationStore, store_path: str, rows: Rows, dicts: list[Dictionary], lm: LoadedModel,
                   cfg: BrowseConfig, checkpoint_dirs: list[Path]) -> dict[str, Any]:
    """What every page needs: the dictionaries, the rows read (token, sequence, document), titles, token strings."""
    docs, doc_local = np.unique(rows.doc_N, return_inverse=True)
    titles = store.docs("title")[docs].tolist() if "docs/title" in store.group else [f"document {d}" for d in docs]
    topic_D = store.docs("topic")[docs].tolist() if "docs/topic" in store.group else [-1] * len(docs)
    return {
        "dictionaries": [{"key": d.key, "run": d.run, "layer": d.layer, "file": data_file(d.run, d.layer),
                          "n_features": len(d.collected.fires_F), "live": int((d.collected.fires_F > 0).sum()),
                          "high_level": d.high_level}
                         for d in dicts],
        "topics": store.topics, "n_rows": rows.n, "ranges": rows.ranges,
        "token": b64(rows.token_N, "int32"), "seq": b64(rows.seq_N, "int32"), "doc": b64(doc_local, "int32"),
        "titles": [str(t) for t in titles], "doc_topic": [int(t) for t in topic_D],
        "vocab": token_strings(lm.tokenizer, shown_tokens(dicts, rows.token_N)),
        "about": {"store": store_path, "model": (store.attrs.get("model") or {}).get("name"),
                  "checkpoints": [str(p) for p in checkpoint_dirs], "config": to_dict(cfg),
                  "logit_note": LOGIT_NOTE.format(vocab="the whole vocabulary" if cfg.logit_vocabulary == "all" else
                                                  f"the {len(np.unique(rows.token_N)):,} token ids of the rows read"),
                  "rows_note": f"{rows.n:,} store rows read: the held-out tail first, then training rows from the "
                               f"store's start ({', '.join(f'[{a:,}, {b:,})' for a, b in rows.ranges)})"},
    }
