"""`csae`: the three stage commands under one name (`csae harvest run`, `csae train fit`, `csae evaluate run`).

The stage commands are also installed on their own (`harvest`, `train`, `evaluate`); both forms run the same
code. `python -m csae.cli ...` works too, e.g. under `torchrun --nproc_per_node N -m csae.cli train fit ...`.
"""

from __future__ import annotations

import click

from csae.evaluate.cli import main as evaluate_main
from csae.harvest.cli import main as harvest_main
from csae.shared.cli import Group
from csae.train.cli import main as train_main


@click.group(cls=Group)
def main() -> None:
    """Contrastive Sparse Autoencoders on cached activations: harvest -> train -> evaluate."""


main.add_command(harvest_main, "harvest")
main.add_command(train_main, "train")
main.add_command(evaluate_main, "evaluate")

if __name__ == "__main__":
    main()
