"""Config machinery: docstrings as help, dict round trips, --set parsing, params files, variadic options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from csae.harvest.cli import main as harvest_main
from csae.shared import device as models
from csae.shared.cli import expand_variadic
from csae.shared.config.base import ConfigError, field_docs, from_dict, load_params, parse_assignment, to_dict
from csae.shared.config.browse import BrowseConfig
from csae.shared.config.evaluate import EvalConfig
from csae.shared.config.harvest import HarvestConfig
from csae.shared.config.sweep import SweepConfig
from csae.shared.config.train import TrainConfig, preset
from csae.shared.lm.models import preset_layers

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_docstring_and_it_is_the_help() -> None:
    for cls in (HarvestConfig, TrainConfig, EvalConfig, BrowseConfig):
        docs = field_docs(cls)
        assert set(docs) == set(cls.__dataclass_fields__), cls
    text = CliRunner().invoke(harvest_main, ["run", "--help"], terminal_width=400).output
    assert "Token rows to store (BOS and padding excluded)." in text and "[default: 200000]" in text


def test_dict_round_trip_and_unknown_keys() -> None:
    cfg = HarvestConfig(layers=(3, 8, 13), tokens=1000)
    assert from_dict(HarvestConfig, to_dict(cfg)) == cfg
    assert to_dict(cfg)["layers"] == [3, 8, 13]
    with pytest.raises(ConfigError, match="tokenz"):
        from_dict(HarvestConfig, {"tokenz": 5})


def test_validation_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="tokens must be positive"):
        HarvestConfig(tokens=0)
    with pytest.raises(ConfigError, match="layers must be increasing"):
        HarvestConfig(layers=(8, 3))


def test_set_assignments_are_typed() -> None:
    assert parse_assignment(TrainConfig, "l1=0.5") == ("l1", 0.5)
    assert parse_assignment(TrainConfig, "expansion=8") == ("expansion", 8)
    assert parse_assignment(HarvestConfig, "layers=1,2") == ("layers", (1, 2))
    with pytest.raises(ConfigError, match="not a valid"):
        parse_assignment(TrainConfig, "expansion=big")
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment(TrainConfig, "nosuchkey=1")


def test_params_sections(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("harvest:\n  tokens: 10\nruns:\n  baseline:\n    alpha: 0.0\n")
    assert load_params(params, "harvest") == {"tokens": 10}
    assert load_params(params, "runs.baseline") == {"alpha": 0.0}
    with pytest.raises(ConfigError, match="no section 'train'"):
        load_params(params, "train")


def test_variadic_options_expand_to_repeated_form() -> None:
    args = ["run", "--layers", "5", "12", "19", "--store", "a.zarr", "--set", "l1=2", "alpha=0"]
    assert expand_variadic(args, ["--layers", "--set"]) == [
        "run", "--layers", "5", "--layers", "12", "--layers", "19", "--store", "a.zarr",
        "--set", "l1=2", "--set", "alpha=0"]


def test_preset_layers_are_the_paper_depths() -> None:
    assert preset_layers(26) == (5, 12, 19)  # Gemma-2-2B, as in the paper
    assert preset_layers(18) == (3, 8, 13)  # Gemma 3 270M: the same relative depths


@pytest.mark.parametrize(("fast_bf16", "want"), [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_follows_the_cpu_and_a_forced_dtype_wins(monkeypatch: pytest.MonkeyPatch, fast_bf16: bool,
                                                            want: str) -> None:
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert models.resolve_dtype("auto", "cpu") == want
    for forced in ("float32", "bfloat16"):
        assert models.resolve_dtype(forced, "cpu") == forced
    # the benchmarks time bfloat16 only where it is native (emulated, one product took 57x float32's)
    assert models.timed_dtypes("cpu") == (["float32", "bfloat16"] if fast_bf16 else ["float32"])


def test_cpu_flags_decide_fast_bf16(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")  # a Xeon without BF16: emulated
    assert not models.cpu_has_fast_bf16()
    cpuinfo.write_text("flags\t\t: fpu sse fma avx avx2\n")  # an AMD EPYC with AVX2 only: emulated
    assert not models.cpu_has_fast_bf16()
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")  # AMD EPYC Zen 4
    assert models.cpu_has_fast_bf16()
    cpuinfo.write_text("flags\t\t: fpu amx_bf16 amx_tile\n")  # Intel Sapphire Rapids
    assert models.cpu_has_fast_bf16()


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml"])
def test_params_files_list_every_config_field(name: str) -> None:
    """Every field of every stage config is in the params file (so `dvc exp run -S <stage>.<key>=...` works for
    each), nothing else is, and each section builds its config."""
    params = yaml.safe_load((ROOT / name).read_text())
    for section, cls in (("harvest", HarvestConfig), ("train", TrainConfig), ("sweep", SweepConfig),
                         ("evaluate", EvalConfig), ("browse", BrowseConfig)):
        fields = [f.name for f in dataclasses.fields(cls)]
        assert list(params[section]) == fields, f"{name} [{section}] differs from {cls.__name__}'s fields"
        from_dict(cls, params[section])
    for run, overrides in params["runs"].items():
        from_dict(TrainConfig, {**params["train"], **overrides})
        assert set(overrides) <= {f.name for f in dataclasses.fields(TrainConfig)}, run
    assert params["runs"]["baseline"] == {"alpha": 0.0, "beta": 0.0}  # differs from the CSAE only in the loss
    assert list(params["runs"])[-1] == "baseline"  # evaluate compares every run with the last one
    if "tsae" in params["runs"]:  # T-SAE differs from the others in its loss and positives only, not in k or arch
        tsae = from_dict(TrainConfig, {**params["train"], **params["runs"]["tsae"]})
        assert (tsae.architecture, tsae.positives, tsae.contrast_on, tsae.matryoshka_high) == (
            "batchtopk", "adjacent", "high_level", 0.2)
        assert set(params["runs"]["tsae"]) == {"alpha", "beta", "positives", "matryoshka_high", "contrast_on"}


def test_paper_params_are_the_paper_preset() -> None:
    params = yaml.safe_load((ROOT / "params-paper.yaml").read_text())
    assert from_dict(TrainConfig, params["train"]) == preset("paper")
    harvest = from_dict(HarvestConfig, params["harvest"])
    assert (harvest.model, harvest.dataset, harvest.layers, harvest.tokens) == (
        "google/gemma-2-2b", "monology/pile-uncopyrighted", (5, 12, 19), 100_000)


def test_the_csae_command_groups_the_three_stages(tmp_path: Path) -> None:
    """`csae <stage> ...` runs the stage's own command: its --help, and its one-line error on a missing store."""
    from csae.cli import main as csae_main

    runner = CliRunner()
    listed = runner.invoke(csae_main, ["--help"])
    assert listed.exit_code == 0 and all(stage in listed.output for stage in ("harvest", "train", "evaluate"))
    missing = tmp_path / "missing.zarr"
    for args in (["harvest", "info", str(missing)], ["train", "fit", "--store", str(missing)]):
        result = runner.invoke(csae_main, args)
        assert result.exit_code == 2 and f"{missing} does not exist" in result.output, result.output

