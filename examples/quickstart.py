"""csae from Python, as in a notebook: harvest a small store, train a CSAE and its plain-SAE baseline on one
layer, evaluate both, and look at a feature. About a minute and a half on 2 CPU cores with the embedded model.

    python examples/quickstart.py [WORKDIR]

Each step is a cell: run them one by one in a notebook, changing what you like (any config field is a
keyword argument: `train(..., k=32)`).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from csae.api import evaluate, harvest, load_sae, train


def main(workdir: str | Path = "csae-quickstart", *, model: str = "gemma-3-270m", dataset: str = "wiki-vital",
         layer: int = 8, tokens: int = 40_000, chunk_rows: int = 1024, train_tokens: int = 102_400,
         ce_tokens: int = 256) -> dict[str, dict[str, float]]:
    workdir = Path(workdir)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # 1. Cache the residual stream after block `layer` (resumes if interrupted; kept if already complete).
    store = harvest(workdir / "acts.zarr", model=model, dataset=dataset, layers=(layer,), tokens=tokens,
                    chunk_rows=chunk_rows)

    # 2. Train the CSAE and the baseline: the same settings but for the loss (alpha = beta = 0), each with
    #    seeds 0 and 1 (one SAE per seed: the spread between seeds is part of any comparison).
    for run, loss in {"csae": {}, "baseline": {"alpha": 0.0, "beta": 0.0}}.items():
        train(workdir / "acts.zarr", workdir / "checkpoints" / run, tokens=train_tokens, overwrite=True, **loss)

    # 3. Evaluate both on held-out data (unlearning skipped here: it costs minutes). Every figure is the mean over
    #    seeds with a 95% interval; the CSAE is compared with the baseline (the last run given).
    metrics = evaluate(workdir / "acts.zarr", [workdir / "checkpoints" / "csae", workdir / "checkpoints" / "baseline"],
                       workdir / "eval", ce_tokens=ce_tokens, unlearn_known=0)
    for run in ("csae", "baseline"):
        m = metrics[f"{run}/layer_{layer}"]
        print(f"{run}: explained variance {m['explained_variance']:.3f} [{m['explained_variance_lo']:.3f}, "
              f"{m['explained_variance_hi']:.3f}], CE score {m['ce_score']:.3f}, L0 {m['l0']:.1f}")
    sections = (workdir / "eval" / "report.md").read_text().split("\n## ")
    print(next(s for s in sections if "verdicts" in s.split("\n")[0]))  # the verdict table

    # 4. Load the CSAE and find the feature that fires most on the first held-out rows.
    sae, _head, info = load_sae(workdir / "checkpoints" / "csae" / "seed_0" / f"layer_{layer}")
    x = store.read(layer, info.train_rows, min(info.train_rows + 512, store.n_rows)).float()
    with torch.no_grad():
        f = sae.encode(x)
    top = int(f.sum(dim=0).argmax())
    print(f"feature {top} fires on {int((f[:, top] > 0).sum())} of {len(x)} held-out tokens "
          f"(a {info.config.architecture} SAE trained with {'='.join(map(str, info.config.sparsity))}, "
          f"{info.config.steps} steps)")
    return metrics


if __name__ == "__main__":
    main(*sys.argv[1:2])
