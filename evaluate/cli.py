"""`evaluate run`. Thin: parse options, build the config, call evaluate.run."""

from __future__ import annotations

from pathlib import Path

import click

from csae.shared.cli import Group, cache_dir, params_option, store_option
from csae.shared.config.base import click_options, from_dict, given, load_params
from csae.shared.config.evaluate import EvalConfig


@click.group(cls=Group)
def main() -> None:
    """Measure trained (C)SAEs on held-out data: reconstruction, sparsity, contrastive, unlearning."""


@main.command()
@click_options(EvalConfig)
@store_option("The activation store the checkpoints were trained on (its held-out tail is evaluated).")
@click.option("--checkpoints", "checkpoints", type=click.Path(path_type=Path), multiple=True,
              help="A `train fit --out` directory (layer_<L>/ inside). Repeat to compare runs side by side; each "
                   "run is named by its directory name.  [default: checkpoints]")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval"), show_default=True,
              help="Output directory: metrics.json (headline), metrics_all.json, unlearning.json, PNG plots, "
                   "report.md.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@params_option("evaluate")
def run(store: str, checkpoints: tuple[Path, ...], out: Path, no_progress: bool, params: str | None,
        **options: object) -> None:
    """Evaluate every trained layer of each checkpoint directory and write metrics, plots and a report."""
    from csae.evaluate.run import evaluate

    cfg = from_dict(EvalConfig, {**(load_params(params, "evaluate") if params else {}),
                                 **given(EvalConfig, options)})
    metrics = evaluate(cfg, store, list(checkpoints) or [Path("checkpoints")], out, cache_dir=cache_dir(),
                       progress=not no_progress)
    for key, m in metrics.items():
        shown = ", ".join(f"{k} {m[k]:.3f}" for k in ("explained_variance", "ce_score", "l0", "unlearn_U",
                                                     "unlearn_U_minus_random") if k in m)
        click.echo(f"{key}: {shown}")
    click.echo(f"wrote {out / 'metrics.json'} and {out / 'report.md'}")


if __name__ == "__main__":
    main()
