"""`evaluate run` and `evaluate browse`. Thin: parse options, build the config, call the library."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from csae.shared.cli import Group, params_option, store_option
from csae.shared.config.base import click_options, from_dict, given, load_params
from csae.shared.config.browse import BrowseConfig
from csae.shared.config.evaluate import EvalConfig
from csae.shared.entry import cache_dir


def checkpoints_option(what: str) -> Callable[[Callable], Callable]:
    return click.option("--checkpoints", "checkpoints", type=click.Path(path_type=Path), multiple=True,
                        help=f"A `train fit --out` directory (seed_<s>/layer_<L>/ inside). Several: {what}; runs are "
                             f"named by their directory name.  [default: checkpoints]")


def config(cls: type, section: str, params: str | None, options: dict[str, Any]) -> Any:
    """The stage config: the params file's section, then the options given on the command line."""
    return from_dict(cls, {**(load_params(params, section) if params else {}), **given(cls, options)})


@click.group(cls=Group)
def main() -> None:
    """Measure trained (C)SAEs on held-out data, with intervals, and compare runs: reconstruction, sparsity,
    downstream loss, contrastive, topic, unlearning."""


@main.command()
@click_options(EvalConfig)
@store_option("The activation store the checkpoints were trained on (its held-out tail is evaluated).")
@checkpoints_option("each run is compared with the last one given (the reference, e.g. the baseline), then each "
                    "pair of the others (--pairs chooses)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval"), show_default=True,
              help="Output directory: metrics.json (headline figures with intervals, verdicts), comparison.json, "
                   "metrics_all.json, unlearning.json, PNG plots, report.md. Replaced as a whole when the run is "
                   "complete (other files there are kept).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@params_option("evaluate")
def run(store: str, checkpoints: tuple[Path, ...], out: Path, no_progress: bool, params: str | None,
        **options: object) -> None:
    """Evaluate every trained SAE of each checkpoint directory; write metrics with intervals, the paired
    comparisons of runs at matched L0 (--pairs), plots and a report."""
    from csae.evaluate.run import evaluate_to

    cfg = config(EvalConfig, "evaluate", params, options)
    metrics = evaluate_to(cfg, store, list(checkpoints) or [Path("checkpoints")], out, cache_dir=cache_dir(),
                       progress=not no_progress)
    for key, m in metrics.items():
        if "/seed_" in key:
            continue
        shown = ", ".join(f"{k} {m[k]:.3f} [{m[k + '_lo']:.3f}, {m[k + '_hi']:.3f}]"
                          for k in ("explained_variance", "ce_score", "l0", "unlearn_U") if k + "_lo" in m)
        click.echo(f"{key}: {shown}")
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'comparison.json'} and {out / 'report.md'}")


@main.command()
@click_options(BrowseConfig)
@store_option("The activation store the checkpoints were trained on (the rows whose contexts the pages show).")
@checkpoints_option("each run gets its pages and each feature links its best match in the others")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval/browser"), show_default=True,
              help="Output directory: index.html (open it in a browser, no server needed) with browser.js, "
                   "browser.css and data/*.js. Replaced as a whole when the build is complete.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--results", type=click.Path(path_type=Path), default=None,
              help="The --out directory of `evaluate run`: the start page shows its frontier and matched-L0 verdicts, "
                   "each dictionary page the features sparse probing chose per topic.")
@params_option("browse")
def browse(store: str, checkpoints: tuple[Path, ...], out: Path, no_progress: bool, results: Path | None,
           params: str | None, **options: object) -> None:
    """Write a static feature browser of every run's SAEs (one seed): per dictionary an index of its features,
    per feature its top and sampled contexts, activation histogram, logit effects, topics and neighbours."""
    from csae.evaluate.browse.build import build

    cfg = config(BrowseConfig, "browse", params, options)
    built = build(cfg, store, list(checkpoints) or [Path("checkpoints")], out, cache_dir=cache_dir(),
                  progress=not no_progress, results=results)
    click.echo(f"wrote {built.index} ({len(built.dictionaries)} dictionaries, {built.bytes / 2**20:.1f} MiB) in "
               f"{built.seconds:.0f} s; open it in a browser")


if __name__ == "__main__":
    main()
