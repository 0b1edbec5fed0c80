"""`harvest repair`: recompute the damaged chunks of a store from the model and corpus it was made with.

The store records its settings, and the plan says which batches fill which rows, so a damaged chunk costs
the forward of the few batches that overlap it (its write unit: the chunk, or its shard), not a new
harvest. Every array's rows in that unit are rewritten, verified again, and reported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from csae.harvest.plan import assign, make_plan
from csae.harvest.run import resolve_layers
from csae.harvest.write import fill
from csae.shared.errors import UserError
from csae.shared.lm.models import load_model
from csae.shared.locks import Lock
from csae.shared.store import schema
from csae.shared.store.verify import Damage, verify

log = logging.getLogger(__name__)


def damaged(store: schema.ActivationStore, *, progress: bool = False) -> list[Damage]:
    """Every damaged or missing chunk of the store's arrays (rows below n_rows; docs entirely)."""
    from tqdm import tqdm

    arrays = schema.row_arrays(store.group) + [f"docs/{n}" for n in ("source_index", "topic", "title")
                                                if f"docs/{n}" in store.group]
    total = sum(store.n_rows if name.split("/")[0] != "docs" else store.group[name].shape[0] for name in arrays)
    with tqdm(total=total, unit="row", unit_scale=True, desc="verify", disable=not progress, leave=False) as bar:
        return verify(store.group, arrays, store.n_rows, bar.update)


def repair(path: str, *, cache_dir: Path, progress: bool = True) -> list[Damage]:
    """Recompute what `damaged` finds; returns what was repaired (UserError if something stays damaged)."""
    with Lock(path, command="harvest repair", what="store", option="STORE"):
        store = schema.ActivationStore.open(path)
        found = damaged(store, progress=progress)
        if not found:
            log.info("%s: every chunk reads and matches its checksum; nothing to repair", path)
            return []
        cfg = store.harvest_config
        lm = load_model(cfg.model, cache_dir=cache_dir, dtype=cfg.dtype, device=cfg.device, revision=cfg.revision)
        cfg = resolve_layers(cfg, lm)
        plan = make_plan(cfg, lm.tokenizer, progress=progress)
        if plan.n_rows != store.n_rows or lm.identity != store.attrs.get("model"):
            raise UserError(f"cannot repair {path}: its model or corpus changed since it was harvested (the plan "
                            f"has {plan.n_rows:,} rows, the store {store.n_rows:,}; model {lm.identity} vs "
                            f"{store.attrs.get('model')}); move the store aside and harvest again")
        group = schema.open_group(path, mode="r+")
        rows = [d for d in found if d.array.split("/")[0] != "docs"]
        if rows:
            keep = np.ones(-(-store.n_rows // store.chunk_rows), dtype=bool)
            keep[[d.chunk for d in rows]] = False
            (ranges,) = assign(keep, int(store.attrs.get("shard_chunks", 1)), 1)
            fill(group, path, cfg, lm, plan, ranges, rank=0, world=1, show=progress,
                 fix="nothing was lost: the same command resumes the repair")
        if len(rows) < len(found):
            topics = store.topics
            schema.write_docs_(group, plan.docs.source_index, [topics.index(t) for t in plan.docs.topic],
                               plan.docs.title)
        still = damaged(schema.ActivationStore.open(path))
        if still:
            raise UserError(f"{len(still)} chunk(s) of {path} are still damaged after the repair (first: "
                            f"{still[0].describe()}); check the disk, then move the store aside and harvest again")
        return found
