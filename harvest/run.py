"""`harvest run`: lock the store, plan every row, fill what is missing (on one rank or many), finish once.

What happens to an existing store (all under its lock, decided by rank 0):
- the same settings, complete: nothing to do;
- the same settings but for `tokens`, or an interrupted run: fill the missing rows in place (resume, or
  append when the budget grew; rows already there are exactly what a fresh run would write);
- other settings, with --overwrite: build the new store beside it (`.<name>.new`), and swap it in only
  when complete; until then the old store stays readable and complete, and a failure leaves it untouched;
- an unfinished store (creation interrupted before any row was written): restarted.
A directory that is not a csae store is never deleted.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from csae.harvest.plan import Plan, assign, make_plan
from csae.harvest.write import fill
from csae.shared import files
from csae.shared.config.base import to_dict
from csae.shared.config.harvest import HarvestConfig
from csae.shared.device import resolve_device, resolve_dtype
from csae.shared.errors import UserError
from csae.shared.lm import corpora
from csae.shared.lm.models import LoadedModel, load_model, preset_layers
from csae.shared.locks import Lock, local_target
from csae.shared.ranks import Ranks
from csae.shared.store import schema
from csae.shared.store.records import chunk_sums
from csae.shared.version import __version__

log = logging.getLogger(__name__)

STAGING = ".new"


def resolve_layers(cfg: HarvestConfig, lm: LoadedModel) -> HarvestConfig:
    """The config with explicit layers (the model's preset when none were given), range-checked."""
    n = lm.n_layers
    layers = cfg.layers or preset_layers(n)
    bad = [x for x in layers if x >= n]
    if bad:
        raise UserError(f"layer(s) {bad} out of range: {cfg.model} has {n} blocks, so valid layers are 0-{n - 1}")
    if cfg.context > lm.max_positions:
        raise UserError(f"--context {cfg.context} exceeds the {lm.max_positions:,} positions {cfg.model} was built "
                        f"for; pass --context {lm.max_positions} or less")
    return dataclasses.replace(cfg, layers=tuple(layers))


def store_attrs(cfg: HarvestConfig, lm: LoadedModel) -> dict[str, Any]:
    return {"model": lm.identity, "corpus": corpora.describe(cfg.dataset), "split": cfg.split,
            "context": cfg.context, "csae_version": __version__, "config": to_dict(cfg)}


@dataclass(frozen=True)
class Job:
    target: str
    """Where rows are written: the store, or its replacement beside it."""
    ranges: list[list[tuple[int, int]]]
    """Per rank, the (first chunk, chunks) ranges it writes."""
    replacing: bool
    rows_before: int


def harvest(cfg: HarvestConfig, store: str | Path, *, cache_dir: Path, overwrite: bool = False,
            progress: bool = True, lm: LoadedModel | None = None, ranks: Ranks | None = None) -> schema.ActivationStore:
    """Fill `store` with cfg.tokens rows of residual-stream activations per layer (or resume, append, or keep
    it). Under torchrun every rank calls this with its `ranks`; they share rank 0's lock."""
    path, ranks = str(store), ranks or Ranks()
    lock = Lock(path, command="harvest run", pid=ranks.launcher_pid, ranks=ranks.world, what="store", option="--store")
    ranks.first(lambda: bool(lock.acquire()))
    try:
        _harvest(cfg, path, cache_dir, overwrite, progress, lm, ranks)
    except KeyboardInterrupt:
        raise UserError("interrupted; the rows written so far are kept: run the same command again to resume") \
            from None
    finally:
        lock.release()
    ranks.barrier()
    return schema.ActivationStore.open(path)


def _harvest(cfg: HarvestConfig, path: str, cache_dir: Path, overwrite: bool, progress: bool, lm: LoadedModel | None,
             ranks: Ranks) -> None:
    """Model, plan, then rank 0 decides where rows go and every rank writes its share."""
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, cfg.device))
    corpora.check_local(cfg.dataset)  # a missing or empty corpus file: before the model loads
    lm = lm or load_model(cfg.model, cache_dir=cache_dir, dtype=cfg.dtype, device=_device(cfg.device, ranks),
                          revision=cfg.revision)
    cfg = resolve_layers(cfg, lm)
    plan = make_plan(cfg, lm.tokenizer, ranks=ranks, progress=progress and ranks.main)
    job = ranks.first(lambda: prepare(path, cfg, lm, plan, overwrite=overwrite, world=ranks.world))
    if job is None:
        log.info("%s is already complete for these settings; nothing to do", path)
    else:
        _run(job, path, cfg, lm, plan, ranks, progress)


def _device(device: str, ranks: Ranks) -> str:
    """Under torchrun each rank takes its own GPU."""
    resolved = resolve_device(device)
    return f"cuda:{ranks.local_rank}" if resolved.type == "cuda" and ranks.distributed else str(resolved)


def _run(job: Job, path: str, cfg: HarvestConfig, lm: LoadedModel, plan: Plan, ranks: Ranks, progress: bool) -> None:
    untouched = (f"the existing store {path} is untouched (its replacement is being built in {job.target}; the "
                 f"same command resumes it)")
    fix = untouched if job.replacing else "the rows written so far are kept: the same command resumes"
    try:
        fill(schema.open_group(job.target, mode="r+"), job.target, cfg, lm, plan, job.ranges[ranks.rank],
             rank=ranks.rank, world=ranks.world, show=progress and ranks.main, fix=fix)
        ranks.barrier()
        ranks.first(lambda: complete(job, path, cfg, plan, ranks.world))
    except UserError as err:
        raise UserError(f"{err}; {untouched}" if job.replacing and untouched not in str(err) else str(err)) from None
    except BaseException:
        if job.replacing:
            log.error(untouched)
        raise


def inspect(path: str) -> tuple[str, schema.ActivationStore | None]:
    """('missing' | 'unfinished' | 'csae' | 'foreign', the opened store if csae)."""
    if not schema.exists(path):
        return "missing", None
    if schema.is_unfinished(path):
        return "unfinished", None
    try:
        return "csae", schema.ActivationStore.open(path, require_complete=False)
    except schema.UnfinishedStore:
        return "unfinished", None
    except UserError:
        return "foreign", None


def prepare(path: str, cfg: HarvestConfig, lm: LoadedModel, plan: Plan, *, overwrite: bool,
            world: int) -> Job | None:
    """Rank 0, holding the lock: decide where rows go (see the module docstring) and who writes which."""
    staging = schema.sibling(path, STAGING)
    _sweep(path)
    state, old = inspect(path)
    if state == "foreign":
        raise UserError(f"{path} exists and is not a csae store; choose another --store path (it is not deleted, "
                        f"even with --overwrite)")
    if state == "unfinished":
        log.info("restarting %s: its creation was interrupted before any row was written", path)
        schema.remove(path)
    target, replacing = path, False
    if old is not None:
        same = _differing(old.attrs.get("config") or {}, cfg) == []
        if same and old.attrs.get("complete") and old.n_rows == plan.n_rows:
            _drop(staging)
            return None
        if not same or (old.attrs.get("complete") and plan.n_rows < old.n_rows):
            if not old.attrs.get("complete") and old.rows_done() == 0:
                schema.remove(path)  # nothing written yet: nothing to lose
            elif not overwrite:
                diff = _differing(old.attrs.get("config") or {}, cfg) or ["tokens (fewer than the store holds)"]
                raise UserError(f"{path} was made with other settings (differing: {', '.join(diff)}); pass "
                                f"--overwrite to replace it or choose another --store")
            else:
                target, replacing = staging, True
    if not replacing:
        _drop(staging)
    return _open_target(target, cfg, lm, plan, world, replacing)


def _open_target(target: str, cfg: HarvestConfig, lm: LoadedModel, plan: Plan, world: int, replacing: bool) -> Job:
    state, existing = inspect(target)
    if existing is not None and _differing(existing.attrs.get("config") or {}, cfg):
        schema.remove(target)  # a replacement begun with other settings
        existing = None
    if state in ("unfinished", "foreign") and schema.exists(target):
        schema.remove(target)  # only reached for the hidden replacement (the store itself is checked above)
    if existing is None:
        group = schema.create(target, layers=cfg.layers, d_model=lm.d_model, capacity=plan.n_rows,
                              chunk_rows=cfg.chunk_rows, shard_chunks=cfg.shard_chunks, attrs=store_attrs(cfg, lm))
        rows_before = 0
    else:
        group = schema.open_group(target, mode="r+")
        schema.ensure_rows_(group, plan.n_rows)
        rows_before = existing.n_rows if existing.attrs.get("complete") else 0
    done, _ = chunk_sums(group, plan.n_rows)
    return Job(target, assign(done, int(group.attrs.get("shard_chunks", 1)), world), replacing, rows_before)


def _differing(recorded: dict[str, Any], cfg: HarvestConfig) -> list[str]:
    """Settings that differ from the store's, except `tokens` (a store grows or resumes to any budget)."""
    defaults = to_dict(HarvestConfig())  # for settings added since the store was made
    return sorted(k for k, v in to_dict(cfg).items() if k != "tokens" and recorded.get(k, defaults[k]) != v)


def _sweep(path: str) -> None:
    """What killed writers left: zarr's temporary files, a store moved aside by an interrupted swap."""
    local = local_target(path)
    if local is None:
        return
    files.recover_displaced(local)
    for d in (local, local_target(schema.sibling(path, STAGING))):
        files.sweep_temp(d, ("*.partial",))  # type: ignore[arg-type]


def _drop(staging: str) -> None:
    if schema.exists(staging):
        log.info("removing %s, an unfinished replacement that is no longer wanted", staging)
        schema.remove(staging)


def complete(job: Job, path: str, cfg: HarvestConfig, plan: Plan, world: int) -> None:
    """Rank 0, after every rank is done: documents, norms, `complete`; then the swap (--overwrite)."""
    group = schema.open_group(job.target, mode="r+")
    done, _ = chunk_sums(group, plan.n_rows)
    if not done.all():
        raise UserError(f"{int((~done).sum())} chunk(s) of {job.target} are still missing after every rank "
                        f"finished; run the same command again to fill them")
    if plan.n_rows < cfg.tokens:
        log.warning("the corpus ran out after %d of %d tokens; the store holds %d", plan.n_rows, cfg.tokens,
                    plan.n_rows)
    topics = sorted(set(plan.docs.topic))
    schema.write_docs_(group, plan.docs.source_index, [topics.index(t) for t in plan.docs.topic], plan.docs.title)
    history = [*group.attrs.get("history", []), {
        "rows": [job.rows_before, plan.n_rows], "ranks": world, "csae_version": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
    schema.finish_(group, plan.n_rows, {"topics": topics, "config": to_dict(cfg), "history": history})
    if job.replacing:
        schema.replace(job.target, path)
