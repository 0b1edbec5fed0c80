"""`harvest run` and `harvest info`. Thin: parse options, build the config, call harvest.run."""

from __future__ import annotations

import json

import click

from csae.shared import schema
from csae.shared.cli import Group, cache_dir, params_option, store_option
from csae.shared.config.base import click_options, from_dict, given, load_params
from csae.shared.config.harvest import HarvestConfig


@click.group(cls=Group)
def main() -> None:
    """Run a language model once over a corpus and cache its residual stream in a Zarr store."""


@main.command()
@click_options(HarvestConfig)
@store_option("Output Zarr store. Re-running the same command resumes an interrupted harvest.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing store made with other settings (one made with the same settings is resumed "
                   "or kept).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@params_option("harvest")
def run(store: str, overwrite: bool, no_progress: bool, params: str | None, **options: object) -> None:
    """Harvest residual-stream activations (layer L = output of block L, 0-based)."""
    from csae.harvest.run import harvest

    opts = {**(load_params(params, "harvest") if params else {}), **given(HarvestConfig, options)}
    if opts.get("layers"):
        opts["layers"] = sorted(set(opts["layers"]))
    cfg = from_dict(HarvestConfig, opts)
    done = harvest(cfg, store, cache_dir=cache_dir(), overwrite=overwrite, progress=not no_progress)
    click.echo(summary(done, store))


@main.command()
@click.argument("store", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print all attributes as JSON.")
def info(store: str, as_json: bool) -> None:
    """Summarise a store. Exits 3 if it is incomplete (resume it with the same `harvest run`)."""
    opened = schema.ActivationStore.open(store, require_complete=False)
    click.echo(json.dumps(opened.attrs, indent=2) if as_json else summary(opened, store))
    if not opened.attrs.get("complete"):
        raise SystemExit(3)


def summary(store: schema.ActivationStore, path: str) -> str:
    a = store.attrs
    target = a.get("config", {}).get("tokens", "?")
    state = "complete" if a.get("complete") else f"INCOMPLETE ({a.get('rows_written', 0):,} of {target:,} rows)"
    model = a.get("model", {})
    size = store.size_bytes()
    norms = a.get("mean_norm", {})
    lines = [
        f"store     {path}  ({state})",
        f"model     {model.get('name')}  {_model_version(model)}",
        f"corpus    {a.get('corpus', {}).get('name')}  split={a.get('split')}  context={a.get('context')}",
        f"layers    {a.get('layers')}  d_model={a.get('d_model')}  dtype={a.get('dtype')}",
        f"tokens    {store.n_rows:,}",
        f"topics    {len(a.get('topics', []))}",
        f"norms     {', '.join(f'{k}: {v:.1f}' for k, v in norms.items()) or '-'}",
        f"size      {size / 2**20:,.1f} MiB ({size / max(store.n_rows, 1) * 1e6 / 2**30:.2f} GiB per 1M tokens)",
    ]
    return "\n".join(lines)


def _model_version(model: dict) -> str:
    for key in ("revision", "version", "sha256"):
        if model.get(key):
            return f"{key}={model[key]}"
    return ""


if __name__ == "__main__":
    main()
