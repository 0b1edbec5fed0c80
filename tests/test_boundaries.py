"""Stages meet only through their files: no stage imports another, and each DVC stage depends on every file
its command imports (so editing any of them re-runs it). Also: one import namespace, `csae`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: pyproject.toml's package-dir mapping: import prefix -> folder
PACKAGES = {"csae.harvest": "harvest", "csae.train": "train", "csae.evaluate": "evaluate", "csae.shared": "shared",
            "csae": "csae"}
STAGES = ("harvest", "train", "evaluate")
#: DVC stages whose command is a subcommand of a stage's console script: stage -> the stage that owns it.
SUBCOMMAND_STAGES = {"browse": "evaluate"}


def module_file(module: str) -> Path | None:
    """The source file of a csae module (its __init__.py for a package), or None if there is none."""
    for prefix, folder in PACKAGES.items():  # longest prefixes first
        if module == prefix or module.startswith(prefix + "."):
            base = ROOT / folder / Path(*module[len(prefix) + 1:].split(".")) if module != prefix else ROOT / folder
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def csae_imports(path: Path) -> set[str]:
    """Every csae module a file imports, anywhere in it (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "csae"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "csae":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return found


def import_closure(module: str) -> set[Path]:
    """The files Python runs when importing `module`: it, its parent packages, and all they import."""
    todo, seen = [module], set()
    while todo:
        mod = todo.pop()
        parts = mod.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = module_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo += sorted(csae_imports(path))
    return seen


def test_no_stage_imports_another() -> None:
    for stage in (*STAGES, "shared"):
        for path in sorted((ROOT / stage).rglob("*.py")):
            imported = csae_imports(path)
            others = {m for m in imported for other in STAGES
                      if other != stage and (m == f"csae.{other}" or m.startswith(f"csae.{other}."))}
            assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}: move what both need into shared/"


def test_the_layers_stack_shared_stages_csae() -> None:
    """shared/ is the bottom floor (it imports no stage and nothing of csae's own CLI or API), the three stages
    stand on it, and csae/ (the `csae` command and the Python API) is the only code that imports several."""
    top = {"csae.api", "csae.cli"}
    for path in sorted((ROOT / "shared").rglob("*.py")):
        up = {m for m in csae_imports(path)
              if m in top or any(m == f"csae.{s}" or m.startswith(f"csae.{s}.") for s in STAGES)}
        assert not up, f"{path.relative_to(ROOT)} imports {sorted(up)}: shared/ must not depend on what stands on it"
    stages_of_api = {s for s in STAGES for m in csae_imports(ROOT / "csae" / "api.py") if m.startswith(f"csae.{s}.")}
    assert stages_of_api == set(STAGES)  # the walk sees the API's imports (it runs every stage)


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists every folder with an __init__.py as a package (a forgotten one would import from a
    source checkout and be missing from a built wheel)."""
    text = (ROOT / "pyproject.toml").read_text()
    start = text.index("packages = [")
    listed = set(re.findall(r'"(csae[\w.]*)"', text[start:text.index("]", start)]))
    for prefix, folder in PACKAGES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((prefix, *rel)) in listed, f"{init.parent.relative_to(ROOT)} is not in pyproject.toml"


def test_each_dvc_stage_depends_on_its_import_closure() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, owner in [*((s, s) for s in STAGES), *SUBCOMMAND_STAGES.items()]:
        spec = stages[stage]["do"] if "do" in stages[stage] else stages[stage]
        deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
        closure = import_closure(f"csae.{owner}.cli")
        assert len(closure) > 5 and ROOT / "shared" / "store" / "schema.py" in closure  # the walk follows imports
        missing = sorted(str(p.relative_to(ROOT)) for p in closure
                         if not any(p.relative_to(ROOT).as_posix() == d.rstrip("/")
                                    or p.relative_to(ROOT).as_posix().startswith(d.rstrip("/") + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {stage} does not depend on {missing}, which its command imports"


def test_stage_names_are_not_importable_at_the_top_level_and_stand_ins_do_not_matter(tmp_path: Path) -> None:
    """Packages named `evaluate` and `train` (Hugging Face's evaluate, a user's train.py) first on sys.path do not
    change what csae imports or runs; csae itself installs nothing under those names."""
    for name, body in (("evaluate", "load = 'huggingface'\n"), ("train", "raise SystemExit('the user train.py')\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    code = """
import importlib.util, sys
import csae.evaluate.run, csae.train.run, csae.cli
import evaluate
assert evaluate.load == 'huggingface', evaluate  # the stand-in, untouched by csae
assert csae.evaluate.run.__file__.endswith('/evaluate/run.py') and 'site-packages' not in csae.evaluate.run.__file__
print('ok')
"""
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    for command in (["csae", "--version"], ["train", "--version"], ["evaluate", "--version"]):
        proc = subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "csae, version" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "csae.cli", "train", "fit", "--store", "missing.zarr"], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.zarr does not exist" in proc.stderr, proc.stderr

    empty = tmp_path / "elsewhere"  # no stand-ins on the path: the stage names are simply not installed
    empty.mkdir()
    probe = ("import importlib.util as u; "
             "print([n for n in ('harvest', 'train', 'evaluate', 'shared') if u.find_spec(n)])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=empty, capture_output=True, text=True,
                          env={"PATH": env["PATH"]})
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
