"""`train fit`. Thin: parse options, build the config (preset < options < --set), call train.run.fit.

Under `torchrun --nproc_per_node N train fit ...` the process group is set up here (gloo on CPU, NCCL
on GPU) from torchrun's environment (csae.shared.entry.distributed); `--distribute` picks data- or
layer-parallel training.
"""

from __future__ import annotations

from pathlib import Path

import click

from csae.shared.cli import Group, params_option, store_option
from csae.shared.config.base import click_options, from_dict, given, load_params, parse_assignment
from csae.shared.config.sweep import SweepConfig
from csae.shared.config.train import PRESETS, TrainConfig, preset
from csae.shared.entry import distributed
from csae.shared.errors import UserError
from csae.shared.sae.checkpoint import layer_dir


@click.group(cls=Group)
def main() -> None:
    """Train Contrastive Sparse Autoencoders on a harvested activation store."""


@main.command()
@store_option("Activation store written by `harvest run`.")
@click.option("--layers", type=int, multiple=True, help="Layers to train (several: --layers 5 12 19). "
              "Default: every layer in the store.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("checkpoints"), show_default=True,
              help="Output directory of the run; seed s, layer L goes to OUT/seed_s/layer_L/.")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default=None,
              help="Starting settings: default (ours, minutes on a CPU) or paper (the reference setup). "
              "[default: default]")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any setting (several: --set l1=2 alpha=0).")
@click.option("--resume", is_flag=True, help="Continue interrupted layers from their last checkpoint; "
              "finished layers are skipped.")
@click.option("--overwrite", is_flag=True, help="Replace existing runs in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--distribute", type=click.Choice(["data", "layers"]), default="data", show_default=True,
              help="Under torchrun: data = every SAE trained by all ranks on disjoint chunks (gradients averaged); "
                   "layers = each rank trains its own share of the (seed, layer) SAEs, each exactly as one process "
                   "would.")
@params_option("train", ", then from `runs.<--run>` (the preset under the key `preset`)")
@click.option("--run", "run_name", default=None, help="With --params: the run whose section `runs.<RUN>` "
              "overrides `train` (e.g. csae, baseline).")
@click.option("--point", type=float, default=None, help="With --params: a point of the `sweep` section: the swept "
              "setting (k or l1) takes this value, and the layers are the sweep's unless it is the main point.")
@click_options(TrainConfig)
def fit(store: str, layers: tuple[int, ...], out: Path, preset_name: str | None, assignments: tuple[str, ...],
        resume: bool, overwrite: bool, no_progress: bool, distribute: str, params: str | None,
        run_name: str | None, point: float | None, **options: object) -> None:
    """Train one CSAE per layer of STORE."""
    from csae.train.run import fit as run_fit
    from csae.train.run import resolve

    from_file: dict[str, object] = {}
    if params:
        from_file = load_params(params, "train")
        if run_name:
            from_file.update(load_params(params, f"runs.{run_name}"))
    if point is not None:
        if not params:
            raise UserError("--point needs --params (the file whose `sweep` section lists the points)")
        sweep = from_dict(SweepConfig, load_params(params, "sweep"))
        from_file.update(sweep.overrides(point))
        layers = layers or sweep.layers_of(point, run_name)
    name = preset_name or str(from_file.pop("preset", "default"))
    overrides = {**from_file, **given(TrainConfig, options)}
    overrides.update(dict(parse_assignment(TrainConfig, a) for a in assignments))
    cfg = resolve(preset(name, **overrides))
    with distributed("nccl" if cfg.device.startswith("cuda") else "gloo") as ranks:
        results = run_fit(cfg, store, out, layers=sorted(layers), resume=resume, overwrite=overwrite,
                          rank=ranks.rank, world=ranks.world, progress=not no_progress, distribute=distribute,
                          launcher_pid=ranks.launcher_pid)
    if ranks.main:
        for (seed, layer), m in results.items():
            if m:
                click.echo(f"seed {seed} layer {layer}: fvu {m['fvu']:.4f}  L0 {m['l0']:.1f}  dead "
                           f"{m['dead_frac']:.3f}  info_nce {m['info_nce']:.3f}  -> {layer_dir(out, seed, layer)}")


if __name__ == "__main__":
    main()
