"""Write the browser: index.html, browser.js, browser.css (copied from assets/) and the data as JavaScript files
that index.html loads with <script> tags (file:// forbids fetch of local files; scripts are allowed).

    <out>/index.html, browser.js, browser.css
    <out>/data/common.js          the runs and dictionaries, the rows read (token id, sequence, document of
                                  each), document titles, the strings of every token shown, what was computed
    <out>/data/<run>_layer_<L>.js one dictionary: per feature its statistics, contexts, logit effects,
                                  neighbours and matches (loaded when the dictionary is opened)

Arrays are base64 of little-endian typed arrays (int32, float32, uint8) to keep the files small: a context's
window is stored as uint8 activations relative to the feature's largest (its exact centre value alongside).
"""

from __future__ import annotations

import base64
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csae.evaluate.browse.collect import Collected
from csae.evaluate.browse.logits import LogitEffects
from csae.shared.errors import UserError

ASSETS = Path(__file__).parent / "assets"
DATA = "data"


def b64(values: np.ndarray | torch.Tensor, dtype: str) -> str:
    arr = values.numpy() if isinstance(values, torch.Tensor) else values
    return base64.b64encode(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def data_file(run: str, layer: int) -> str:
    """A dictionary's data file; a run at a sweep point (csae/k_64) becomes csae_k_64."""
    return f"{DATA}/{run.replace('/', '_')}_layer_{layer}.js"


#: What the start page shows of an evaluate run's output (`evaluate browse --results DIR`).
FRONTIER_PNG, COMPARISON_JSON, PROBES_JSON = "frontier.png", "comparison.json", "probing.json"


def answer_payload(results: Path | None) -> dict[str, Any] | None:
    """The matched-L0 verdicts of `evaluate run --out RESULTS` for the start page: {comparison: {column:
    {figure: [verdict, diff, lo, hi]}}}, the method, and whether the frontier figure is there."""
    if results is None:
        return None
    path = Path(results) / COMPARISON_JSON
    if not path.exists():
        raise UserError(f"{results} has no {COMPARISON_JSON}; pass the --out directory of `evaluate run`")
    data = json.loads(path.read_text())
    tables = {}
    for name, columns in data.items():
        if "_vs_" not in name or not isinstance(columns, dict):
            continue
        tables[name] = {col: {fig: [c.get("verdict"), c.get("diff"), c.get("diff_lo"), c.get("diff_hi")]
                              for fig, c in cells.items() if fig != "at_l0"} for col, cells in columns.items()}
    return {"tables": tables, "method": (data.get("method") or {}).get("comparison", ""),
            "frontier": (Path(results) / FRONTIER_PNG).exists()}


@dataclass
class Dictionary:
    """One run's SAE at one layer, with everything its pages show."""

    run: str
    layer: int
    collected: Collected
    effects: LogitEffects
    neighbours: tuple[torch.Tensor, torch.Tensor]
    matches: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """{other run: (best matching feature, cosine)} at the same layer."""
    probes: dict[str, list[int]] | None = None
    """{topic: the features sparse probing chose for it} (probing.json of `evaluate run`), or None."""
    high_level: int = 0
    """Features [0, high_level) are the SAE's high-level block (a T-SAE's Matryoshka prefix); 0: none."""

    @property
    def key(self) -> str:
        return f"{self.run}/layer_{self.layer}"


def _quantised(win_FKW: torch.Tensor, max_F: torch.Tensor) -> np.ndarray:
    """Window activations as uint8 fractions of the feature's largest activation (0: not firing)."""
    rel = win_FKW / max_F.clamp_min(1e-30).view(-1, 1, 1)
    return (rel.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def dictionary_payload(d: Dictionary) -> dict[str, Any]:
    c = d.collected
    max_F = c.top_val_FK[:, 0].clamp_min(0) if c.top_val_FK.shape[1] else torch.zeros(len(c.fires_F))
    e = d.effects
    ids, cos = d.neighbours
    return {
        "key": d.key, "run": d.run, "layer": d.layer, "n_features": len(c.fires_F), "n_rows": c.n_rows,
        "k_top": c.top_row_FK.shape[1], "k_sample": c.sample_row_FK.shape[1], "width": c.top_win_FKW.shape[2],
        "edges": [float(f"{x:.4g}") for x in c.edges], "fires": b64(c.fires_F, "int32"),
        "max": b64(max_F, "float32"), "topics": b64(c.topic_fires_FT, "int32"), "hist": b64(c.hist_FB, "int32"),
        "top_rows": b64(c.top_row_FK, "int32"), "top_val": b64(c.top_val_FK, "float32"),
        "top_win": b64(_quantised(c.top_win_FKW, max_F), "uint8"),
        "sample_rows": b64(c.sample_row_FK, "int32"), "sample_val": b64(c.sample_val_FK, "float32"),
        "sample_win": b64(_quantised(c.sample_win_FKW, max_F), "uint8"),
        "k_logits": e.up_ids_FK.shape[1], "up_ids": b64(e.up_ids_FK, "int32"), "up": b64(e.up_FK, "float32"),
        "down_ids": b64(e.down_ids_FK, "int32"), "down": b64(e.down_FK, "float32"),
        "k_nb": ids.shape[1], "nb_ids": b64(ids, "int32"), "nb_cos": b64(cos, "float32"),
        "matches": {run: {"ids": b64(m_ids, "int32"), "cos": b64(m_cos, "float32")}
                    for run, (m_ids, m_cos) in d.matches.items()},
        "probes": d.probes, "high_level": d.high_level,
    }


def shown_tokens(dicts: list[Dictionary], token_N: np.ndarray) -> np.ndarray:
    """Every token id a page can show: the rows' tokens and the logit lists' tokens."""
    ids = [np.unique(token_N)] + [np.unique(t.numpy()) for d in dicts
                                  for t in (d.effects.up_ids_FK, d.effects.down_ids_FK)]
    return np.unique(np.concatenate(ids))


def write_site(out: Path, common: dict[str, Any], dicts: list[Dictionary], results: Path | None = None
               ) -> list[Path]:
    """Write the browser into the (new, empty) directory `out`; returns the files written."""
    (out / DATA).mkdir(parents=True)
    written = []
    if results is not None and (Path(results) / FRONTIER_PNG).exists():
        shutil.copyfile(Path(results) / FRONTIER_PNG, out / FRONTIER_PNG)
        written.append(out / FRONTIER_PNG)
    for name in ("index.html", "browser.js", "browser.css"):
        shutil.copyfile(ASSETS / name, out / name)
        written.append(out / name)
    path = out / DATA / "common.js"
    path.write_text(f"CSAE.common = {json.dumps(common, ensure_ascii=False, separators=(',', ':'))};\n")
    written.append(path)
    for d in dicts:
        path = out / data_file(d.run, d.layer)
        payload = json.dumps(dictionary_payload(d), ensure_ascii=False, separators=(",", ":"))
        path.write_text(f"CSAE.addDictionary({payload});\n")
        written.append(path)
    return written
