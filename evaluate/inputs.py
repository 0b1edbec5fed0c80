"""Find and check the trained layers of a checkpoint directory: what `train fit --out DIR` wrote (DIR/seed_<s>/
layer_<L>/), or a run's sparsity sweep, one such directory per point (DIR/<point>/seed_<s>/layer_<L>/, as dvc.yaml's
matrix writes checkpoints/<run>/k_64/)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from csae.shared.errors import UserError
from csae.shared.sae.autoencoder import SAE, WEIGHTS_FILE
from csae.shared.sae.checkpoint import LayerInfo, layer_problem, trained_layers
from csae.shared.sae.head import HEAD_FILE, ContrastiveHead
from csae.shared.store.schema import ActivationStore

log = logging.getLogger(__name__)

#: Identity fields that must agree between the checkpoint's store and the evaluated store.
_IDENTITY_KEYS = ("name", "revision", "version", "sha256", "gguf_sha256")


@dataclass
class LayerCheckpoint:
    run: str
    """The run's name: its checkpoint directory's name (e.g. csae, baseline)."""
    seed: int
    layer: int
    path: Path
    sae: SAE
    head: torch.nn.Module | None
    """The contrastive head, or None when the directory has none."""
    info: LayerInfo
    """train_config.json: the training config plus store, seed, layer, scale."""
    point: str = ""
    """The sparsity point: the name of its directory in a sweep (e.g. k_64); "" for a run without points."""

    @property
    def series(self) -> str:
        """The run at its point (csae/k_64; csae without points): what figures are pooled over seeds for."""
        return f"{self.run}/{self.point}" if self.point else self.run

    @property
    def key(self) -> str:
        return f"{self.series}/seed_{self.seed}/layer_{self.layer}"


def layer_of(key: str) -> int:
    """The layer of a figure key that ends in `layer_<L>` (-1 for any other key)."""
    match = re.search(r"layer_(\d+)$", key)
    return int(match.group(1)) if match else -1


def layer_dirs(directory: Path) -> list[tuple[int, int, Path]]:
    """(seed, layer, dir) of each trained SAE (seed_<s>/layer_<L>/ with weights) of a `train fit --out` run."""
    if not directory.is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist; train with `train fit --out {directory}`")
    found = [(seed, layer, p) for seed, layer, p in trained_layers(directory) if (p / WEIGHTS_FILE).exists()]
    if not found:
        raise UserError(f"{directory} holds no trained layers (no seed_<s>/layer_<L>/{WEIGHTS_FILE}); pass the "
                        f"directory `train fit --out` wrote")
    return found


def run_name(directory: Path) -> str:
    """A run is named by its directory."""
    return directory.resolve().name


def _model_mismatch(want: dict[str, Any], got: dict[str, Any]) -> str | None:
    for key in _IDENTITY_KEYS:
        if want.get(key) is not None and got.get(key) is not None and want[key] != got[key]:
            return f"{key} {got[key]!r} vs {want[key]!r}"
    return None


def check_model(info: LayerInfo, store: ActivationStore, store_path: str, where: Path) -> None:
    """The checkpoint must come from activations of the store's model (identity recorded by harvest)."""
    want = store.attrs.get("model") or {}
    theirs = info.model
    if not theirs and info.store and info.store != str(store_path):  # only the store was recorded: ask it
        try:
            theirs = ActivationStore.open(info.store, require_complete=False).attrs.get("model") or {}
        except UserError:
            theirs = {}
    diff = _model_mismatch(want, theirs)
    if diff:
        raise UserError(f"{where} was trained on activations of model {theirs.get('name')!r}, but store "
                        f"{store_path} holds model {want.get('name')!r} ({diff}); evaluate it on a store of "
                        f"its own model")


def point_dirs(directory: Path) -> list[tuple[str, Path]]:
    """(point, dir) of a run directory: itself with point "" when it holds seed_<s>/ directories, else each
    subdirectory that does (a sweep's points), in the order of their sparsity setting."""
    if not directory.is_dir() or trained_layers(directory):
        return [("", directory)]
    found = [(p.name, p) for p in sorted(directory.iterdir())  # not train's unfinished .overwrite/ and the like
             if p.is_dir() and not p.name.startswith(".") and trained_layers(p)]
    if not found:
        return [("", directory)]  # layer_dirs names what is missing

    def setting(item: tuple[str, Path]) -> float:
        match = re.search(r"([0-9.]+(?:e-?\d+)?)$", item[0])
        return float(match.group(1)) if match else math.inf

    return sorted(found, key=setting)


def load_run(directory: Path, store: ActivationStore, store_path: str) -> list[LayerCheckpoint]:
    """Every trained layer of a run (of each of its sparsity points), checked against the store (layer, d_in,
    model)."""
    out = []
    for point, where in point_dirs(directory):
        out += _load_point(directory, point, where, store, store_path)
    return out


def _load_point(directory: Path, point: str, where: Path, store: ActivationStore, store_path: str
                ) -> list[LayerCheckpoint]:
    out = []
    name = run_name(directory)
    for seed, layer, path in layer_dirs(where):
        info = LayerInfo.read(path)
        problem = layer_problem(path)
        if problem:
            raise UserError(f"checkpoint {path} is not whole ({problem}); re-train it: `train fit --out {directory} "
                            f"--layers {layer} --overwrite` with the run's other settings")
        sae = SAE.load(path).eval().requires_grad_(False)
        head = ContrastiveHead.load(path).eval().requires_grad_(False) if (path / HEAD_FILE).exists() else None
        if layer not in store.layers:
            raise UserError(f"{path} is an SAE for layer {layer}, but store {store_path} has layers {store.layers}")
        if sae.d_in != store.d_model:
            raise UserError(f"{path} takes inputs of width d_in={sae.d_in}, but store {store_path} has "
                            f"d_model={store.d_model}: the checkpoint is for another model")
        if (info.seed, info.layer) != (seed, layer):
            raise UserError(f"{path} says it was trained with seed {info.seed} on layer {info.layer}, not seed "
                            f"{seed}, layer {layer}; move it back to seed_{info.seed}/layer_{info.layer}")
        check_model(info, store, store_path, path)
        out.append(LayerCheckpoint(name, seed, layer, path, sae, head, info, point))
    return out


@dataclass(frozen=True)
class Layout:
    """What is compared: runs in the order given (the last is the reference), their sparsity points, common seeds,
    and the layers each point holds. A series is one run at one point (csae/k_64)."""

    runs: list[str]
    points: list[str]
    """In the order of the swept setting; [""] for runs without points."""
    seeds: list[int]
    layers: list[int]
    """Every layer of any point."""
    point_layers: dict[str, list[int]]
    """The layers each point holds (the same in every run)."""
    fixed_l0: bool
    """Every SAE has a fixed-L0 architecture (topk, batchtopk): runs at one point are at matched L0 by
    construction. Otherwise (relu) runs are matched by interpolating along their sweep in log L0."""
    pairs: tuple[tuple[str, str], ...] = ()
    """The runs compared, (A, B) for A minus B (EvalConfig.pairs); empty: `default_pairs`."""

    @property
    def reference(self) -> str | None:
        return self.runs[-1] if len(self.runs) > 1 else None

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        """The pairs compared, (A, B) for A minus B, in report order."""
        return list(self.pairs) if self.pairs else default_pairs(self.runs)

    @staticmethod
    def series(run: str, point: str) -> str:
        return f"{run}/{point}" if point else run

    @property
    def main_points(self) -> list[str]:
        """The points trained at every layer."""
        return [p for p in self.points if self.point_layers[p] == self.layers]

    def key(self, run: str, seed: int, layer: int) -> str:
        return f"{run}/seed_{seed}/layer_{layer}"


def default_pairs(runs: list[str]) -> list[tuple[str, str]]:
    """Every run minus the reference (the last), then every pair of the other runs in the order given (earlier
    minus later): csae, tsae, baseline -> (csae, baseline), (tsae, baseline), (csae, tsae)."""
    if len(runs) < 2:
        return []
    ref, others = runs[-1], runs[:-1]
    return [(r, ref) for r in others] + [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]


def parse_pairs(pairs: tuple[str, ...], runs: list[str]) -> tuple[tuple[str, str], ...]:
    """EvalConfig.pairs ("A:B") as (A, B), each run one of `runs` (a one-line error naming the unknown one)."""
    out = []
    for pair in pairs:
        a, _, b = pair.partition(":")
        unknown = [r for r in (a, b) if r not in runs]
        if unknown:
            raise UserError(f"pairs: {pair!r} names run {unknown[0]!r}, but the runs evaluated are {', '.join(runs)} "
                            f"(named by their checkpoint directories); list pairs of these")
        out.append((a, b))
    return tuple(dict.fromkeys(out))


def layout(ckpts: list[LayerCheckpoint], pairs: tuple[str, ...] = ()) -> Layout:
    """Every run must hold every point and, at each layer it holds there, every seed; else comparisons would pair
    unlike things: one-line error naming what is missing where. A run may hold fewer layers at a point than
    another (sweep.frontier_only): it is compared at the layers it holds. `pairs`: EvalConfig.pairs."""
    runs = list(dict.fromkeys(c.run for c in ckpts))
    points = list(dict.fromkeys(c.point for c in ckpts))
    have = {(r, p): {(c.seed, c.layer) for c in ckpts if (c.run, c.point) == (r, p)} for r in runs for p in points}
    seeds = sorted({s for held in have.values() for s, _ in held})
    missing: dict[str, list[tuple[int, int]]] = {}
    for p in points:
        union = set().union(*[have[r, p] for r in runs])
        for r in runs:
            layers = {lay for _, lay in have[r, p]} or {lay for _, lay in union}  # no layer at all: all missing
            want = {(s, lay) for s in seeds for lay in layers}
            if want - have[r, p]:
                missing[Layout.series(r, p)] = sorted(want - have[r, p])
    if missing:
        def lacks(m: list[tuple[int, int]]) -> str:
            by_seed = sorted({s for s, _ in m})
            return ", ".join(f"seed {s} (layers {' '.join(str(lay) for t, lay in m if t == s)})" for s in by_seed)

        where = "; ".join(f"run {r} lacks {lacks(m)}" for r, m in missing.items())
        raise UserError(f"the runs do not hold the same points, seeds and layers ({where}); train the missing ones "
                        f"(`train fit --resume` with the same seeds) or evaluate runs trained alike")
    point_layers = {p: sorted({lay for r in runs for _, lay in have[r, p]}) for p in points}
    for r in runs:
        for p in points:
            if (held := sorted({lay for _, lay in have[r, p]})) != point_layers[p]:
                log.info("run %s holds layers %s only at %s: it is compared there only", r, held, p or "its point")
    fixed = all(c.info.config.architecture != "relu" for c in ckpts)
    return Layout(runs, points, seeds, sorted({lay for c in ckpts for lay in [c.layer]}), point_layers, fixed,
                  parse_pairs(pairs, runs))
