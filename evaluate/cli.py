"""`evaluate run`. Thin: parse options, build the config, call evaluate.run."""

from __future__ import annotations

from pathlib import Path

import click

from csae.shared.cli import Group, cache_dir, params_option, store_option
from csae.shared.config.base import click_options, from_dict, given, load_params
from csae.shared.config.evaluate import EvalConfig


@click.group(cls=Group)
def main() -> None:
    """Measure trained (C)SAEs on held-out data, with intervals, and compare runs: reconstruction, sparsity,
    downstream loss, contrastive, topic, unlearning."""


@main.command()
@click_options(EvalConfig)
@store_option("The activation store the checkpoints were trained on (its held-out tail is evaluated).")
@click.option("--checkpoints", "checkpoints", type=click.Path(path_type=Path), multiple=True,
              help="A `train fit --out` directory (seed_<s>/layer_<L>/ inside). Several: each run is compared with "
                   "the last one given (the reference, e.g. the baseline); runs are named by their directory "
                   "name.  [default: checkpoints]")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval"), show_default=True,
              help="Output directory: metrics.json (headline figures with intervals, verdicts), comparison.json, "
                   "metrics_all.json, unlearning.json, PNG plots, report.md.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@params_option("evaluate")
def run(store: str, checkpoints: tuple[Path, ...], out: Path, no_progress: bool, params: str | None,
        **options: object) -> None:
    """Evaluate every trained SAE of each checkpoint directory; write metrics with intervals, the paired
    comparison with the reference run, plots and a report."""
    from csae.evaluate.run import evaluate

    cfg = from_dict(EvalConfig, {**(load_params(params, "evaluate") if params else {}),
                                 **given(EvalConfig, options)})
    metrics = evaluate(cfg, store, list(checkpoints) or [Path("checkpoints")], out, cache_dir=cache_dir(),
                       progress=not no_progress)
    for key, m in metrics.items():
        if "/seed_" in key:
            continue
        shown = ", ".join(f"{k} {m[k]:.3f} [{m[k + '_lo']:.3f}, {m[k + '_hi']:.3f}]"
                          for k in ("explained_variance", "ce_score", "l0", "unlearn_U") if k + "_lo" in m)
        click.echo(f"{key}: {shown}")
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'comparison.json'} and {out / 'report.md'}")


if __name__ == "__main__":
    main()
