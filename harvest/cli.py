"""`harvest run`, `harvest info` and `harvest repair`. Thin: parse options, build the config, call harvest.run.

Under `torchrun --nproc_per_node N harvest run ...` (or `-m csae.harvest.cli`) the ranks share the work of one
store: the process group is set up here from torchrun's environment (see csae.shared.entry.distributed).
"""

from __future__ import annotations

import json

import click

from csae.shared.cli import Group, params_option, store_option
from csae.shared.config.base import click_options, from_dict, given, load_params
from csae.shared.config.harvest import HarvestConfig
from csae.shared.entry import cache_dir, distributed
from csae.shared.store import schema


@click.group(cls=Group)
def main() -> None:
    """Run a language model once over a corpus and cache its residual stream in a Zarr store."""


@main.command()
@click_options(HarvestConfig)
@store_option("Output Zarr store. Re-running the same command resumes an interrupted harvest; a larger --tokens "
              "appends.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store made with other settings: the new one is built beside it and swapped in "
                   "when complete (one made with the same settings is resumed, grown or kept).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@params_option("harvest")
def run(store: str, overwrite: bool, no_progress: bool, params: str | None, **options: object) -> None:
    """Harvest residual-stream activations (layer L = output of block L, 0-based)."""
    from csae.harvest.run import harvest

    opts = {**(load_params(params, "harvest") if params else {}), **given(HarvestConfig, options)}
    if isinstance(opts.get("layers"), (list, tuple)):
        opts["layers"] = sorted(opts["layers"])  # a repeated layer is refused by the config
    cfg = from_dict(HarvestConfig, opts)
    with distributed("gloo") as ranks:
        done = harvest(cfg, store, cache_dir=cache_dir(), overwrite=overwrite, progress=not no_progress, ranks=ranks)
    if ranks.main:
        click.echo(summary(done, store))


@main.command()
@click.argument("store", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print all attributes as JSON.")
@click.option("--verify", is_flag=True, help="Read every chunk and list damaged or missing ones (exit 4 if any).")
def info(store: str, as_json: bool, verify: bool) -> None:
    """Summarise a store. Exits 3 if it is incomplete (resume it with the same `harvest run`), 4 if --verify
    finds damaged chunks (`harvest repair` recomputes them)."""
    opened = schema.ActivationStore.open(store, require_complete=False)
    click.echo(json.dumps(opened.attrs, indent=2) if as_json else summary(opened, store))
    if verify and not opened.attrs.get("complete"):
        click.echo("verify    skipped: the store is incomplete (finish it first)")
    elif verify:
        from csae.harvest.repair import damaged

        found = damaged(opened, progress=True)
        for d in found:
            click.echo(f"damaged   {d.describe()}")
        if found:
            click.echo(f"error: {len(found)} damaged chunk(s) in {store}; `harvest repair {store}` recomputes them",
                       err=True)
            raise SystemExit(4)
        click.echo("verified  every chunk reads and matches its checksum")
    if not opened.attrs.get("complete"):
        raise SystemExit(3)


@main.command()
@click.argument("store", type=str)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def repair(store: str, no_progress: bool) -> None:
    """Recompute the damaged chunks of STORE with the model and corpus it was made with."""
    from csae.harvest.repair import repair as run_repair

    fixed = run_repair(store, cache_dir=cache_dir(), progress=not no_progress)
    for d in fixed:
        click.echo(f"repaired  {d.describe().replace(' fails its checksum', '')}")
    click.echo(f"{store}: {len(fixed)} damaged chunk(s) repaired; every chunk verified")


def summary(store: schema.ActivationStore, path: str) -> str:
    a = store.attrs
    target = store.target_rows
    state = "complete" if a.get("complete") else f"INCOMPLETE ({store.rows_done():,} of {target:,} rows)"
    model = a.get("model", {})
    size = store.size_bytes()
    norms = a.get("mean_norm", {})
    shards = int(a.get("shard_chunks", 1))
    lines = [
        f"store     {path}  ({state})",
        f"model     {model.get('name')}  {_model_version(model)}",
        f"corpus    {a.get('corpus', {}).get('name')}  split={a.get('split')}  context={a.get('context')}",
        f"layers    {a.get('layers')}  d_model={a.get('d_model')}  dtype={a.get('dtype')}",
        f"tokens    {store.n_rows:,}",
        f"chunks    {a.get('chunk_rows')} rows" + (f", {shards} per shard file" if shards > 1 else "")
        + f", checksums {a.get('checksums')}",
        f"topics    {len(a.get('topics', []))}",
        f"norms     {', '.join(f'{k}: {v:.1f}' for k, v in norms.items()) or '-'}",
        f"size      {size / 2**20:,.1f} MiB ({size / max(store.n_rows, 1) * 1e6 / 2**30:.2f} GiB per 1M tokens)",
    ]
    for h in a.get("history", []):
        lines.append(f"written   rows {h['rows'][0]:,}-{h['rows'][1]:,} by {h['ranks']} rank(s), finished "
                     f"{h['finished']}")
    return "\n".join(lines)


def _model_version(model: dict) -> str:
    for key in ("revision", "version", "sha256"):
        if model.get(key):
            return f"{key}={model[key]}"
    return ""


if __name__ == "__main__":
    main()
