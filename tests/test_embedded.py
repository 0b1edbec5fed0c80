"""The embedded default end to end: the real Gemma 3 270M from its GGUF package, on wiki-vital."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import ROW_TOLERANCE, row_error

from csae.harvest.run import harvest
from csae.shared.config.harvest import HarvestConfig
from csae.shared.entry import cache_dir
from csae.shared.lm.models import embedded_model_dir, load_model
from csae.shared.store.schema import ActivationStore

pytestmark = [pytest.mark.embedded, pytest.mark.slow]


def test_embedded_model_harvest_matches_transformers(tmp_path: Path, dtype: str) -> None:
    cfg = HarvestConfig(tokens=300, batch_size=4, sort_window=1, dtype=dtype, device="cpu")
    lm = load_model(cfg.model, cache_dir=cache_dir(), dtype=dtype, device="cpu")
    assert (lm.n_layers, lm.d_model) == (18, 640)
    assert (embedded_model_dir(cache_dir()) / "model.safetensors").is_file()  # converted once, cached
    store = harvest(cfg, tmp_path / "acts.zarr", cache_dir=cache_dir(), progress=False, lm=lm)
    assert store.layers == [3, 8, 13] and store.n_rows == 300 and store.d_model == 640
    assert len(store.topics) > 1  # a fixed shuffle of documents: the file itself is grouped by topic

    seq, ids = store.tokens("seq"), store.tokens("token_id")
    for s in np.unique(seq)[:3]:
        rows = np.flatnonzero(seq == s)
        input_ids = torch.tensor([[lm.tokenizer.bos_token_id, *ids[rows]]])
        with torch.no_grad():
            hidden = lm.model(input_ids, output_hidden_states=True).hidden_states
        for layer in store.layers:
            got = store.read(layer, int(rows[0]), int(rows[-1]) + 1)
            error = row_error(got, hidden[layer + 1][0, 1:])
            assert error <= ROW_TOLERANCE[dtype], (layer, error)
            assert row_error(got, hidden[layer + 2][0, 1:]) > 10 * ROW_TOLERANCE[dtype]  # a wrong block is caught
    reopened = ActivationStore.open(tmp_path / "acts.zarr")
    assert reopened.attrs["model"]["gguf_sha256"] and reopened.attrs["corpus"]["name"] == "wiki-vital"
