"""Helpers of the fault-injection tests: run a stage's command in a subprocess with a fault patched in, compare
stores, damage chunk files, and run a script on a small tmpfs (a mount namespace of its own) where permitted."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from csae.shared.store.schema import TOKEN_FIELDS, ActivationStore

#: Tiny but many steps: 2,000 rows in 32 chunks of 64, batches of 2 sequences.
HARVEST = ["--layers", "5", "12", "--tokens", "2000", "--context", "32", "--batch-size", "2", "--sort-window", "3",
           "--chunk-rows", "64", "--dtype", "float32", "--no-progress"]
#: 20 steps of 128 rows, a checkpoint every 5.
TRAIN = ["--layers", "12", "--set", "tokens=2560", "batch_size=128", "expansion=2", "warmup_steps=5", "seeds=0",
         "checkpoint_every=5", "dtype=float32", "--no-progress"]

#: Faults, as code run before the command: each SIGKILLs the process at one point.
KILL_AT_CREATION = """
    import zarr
    def boom(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    zarr.Group.create_array = boom  # the group's zarr.json (with csae's attributes) is written, no array yet
"""
KILL_MID_CHUNK = """
    from csae.shared.store import schema
    orig, calls = schema.write_rows_, [0]
    def boom(group, start, acts, tokens):
        calls[0] += 1
        if calls[0] == 4:  # the 4th write: activations on disk, token fields not
            for layer, x in acts.items():
                group[schema.acts_name(layer)][start:start + len(x)] = schema.bf16_to_bits(x)
            os.kill(os.getpid(), signal.SIGKILL)
        orig(group, start, acts, tokens)
    schema.write_rows_ = boom
"""
KILL_IN_FINISH = """
    from csae.shared.store import schema
    def boom(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    schema.mean_norms = boom  # every row and the documents are written, arrays trimmed, not marked complete
"""
KILL_BEFORE_SWAP = """
    from csae.shared.store import schema
    def boom(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    schema.replace = boom  # the replacement is complete beside the old store
"""
KILL_IN_CHECKPOINT_WRITE = """
    import torch
    orig = torch.save
    def boom(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 10:  # the second checkpoint: half a file, then death
            with open(f, "wb") as fh:
                fh.write(b"\\0" * 50_000)
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(obj, f, *a, **k)
    torch.save = boom
"""
SLOW_WRITES = """
    import time
    from csae.shared.store import schema
    orig = schema.write_rows_
    def slow(*a, **k):
        time.sleep(0.3)
        orig(*a, **k)
    schema.write_rows_ = slow
"""
SLOW_STEPS = """
    import time
    from csae.train.trainer import CSAETrainer
    orig = CSAETrainer.step
    def slow(self, *a, **k):
        time.sleep(0.2)
        return orig(self, *a, **k)
    CSAETrainer.step = slow
"""


def command(stage: str, args: list[str], patch: str = "") -> list[str]:
    """argv running `<stage> <args>` in a fresh interpreter, with `patch` applied first. Ctrl-C gets Python's
    default handler, as in a terminal: a suite started in the background of a script (`make test &`) would
    hand its children SIGINT ignored, and the Ctrl-C tests would see runs that never stop."""
    code = (f"import os, signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"{textwrap.dedent(patch)}\nfrom csae.{stage}.cli import main\nsys.exit(main())")
    return [sys.executable, "-c", code, *map(str, args)]


def run(stage: str, args: list[str], patch: str = "", **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(stage, args, patch), capture_output=True, text=True, timeout=600, **kw)


def start(stage: str, args: list[str], patch: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(command(stage, args, patch), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error(stderr: str) -> str:
    """The single `error: ...` line of a failed command; fails if there is none, several, or a traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def assert_same_store(a: Path | str, b: Path | str) -> None:
    x, y = ActivationStore.open(a), ActivationStore.open(b)
    assert x.n_rows == y.n_rows and x.layers == y.layers
    for layer in x.layers:
        assert np.array_equal(x.acts(layer)[:], y.acts(layer)[:]), layer
    for name in TOKEN_FIELDS:
        assert np.array_equal(x.tokens(name), y.tokens(name)), name
    for name in ("title", "topic", "source_index"):
        assert np.array_equal(x.docs(name), y.docs(name)), name
    assert x.attrs["mean_norm"] == y.attrs["mean_norm"] and x.attrs["topics"] == y.attrs["topics"]


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@functools.cache
def mount_namespace() -> list[str] | None:
    """The unshare command that gives a process tree its own mounts (tmpfs allowed), or None if not permitted."""
    for argv in (["unshare", "-m"], ["unshare", "-rm"]):
        try:
            probe = 'd=$(mktemp -d); mount -t tmpfs -o size=64k tmpfs "$d"; rc=$?; umount "$d"; rmdir "$d"; exit $rc'
            ok = subprocess.run([*argv, "sh", "-c", probe], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return argv
    return None


def on_tmpfs(mount: Path, size: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run the shell `script` with a tmpfs of `size` mounted at `mount`; `$PY` is this Python."""
    mount.mkdir(parents=True, exist_ok=True)
    argv = mount_namespace()
    assert argv is not None
    body = f"set -u; mount -t tmpfs -o size={size} tmpfs {mount}\n{textwrap.dedent(script)}"
    return subprocess.run([*argv, "sh", "-c", body], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PY": sys.executable})

#: evaluate on the reference store and SAE without the language model (seconds).
EVALUATE = ["--ce-tokens", "0", "--unlearn-known", "0", "--bootstrap-resamples", "200", "--no-progress"]
#: evaluate's headline files; eval_config.json differs between identical runs in its timings only.
EVAL_JSON = ("metrics.json", "comparison.json", "metrics_all.json", "unlearning.json")
KILL_AFTER_METRICS = """
    from csae.evaluate import run as r
    def boom(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    r.write_plots = boom  # metrics.json and the other JSON files are written, plots and report.md not
"""
KILL_IN_SITE = """
    from csae.evaluate.browse import build as b
    orig = b.write_site
    def boom(out, *a, **k):
        orig(out, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    b.write_site = boom  # every file of the new site is written, not yet swapped in
"""
SLOW_EVALUATE = """
    import time
    from csae.evaluate import run as r
    orig = r.store_families
    def slow(*a, **k):
        time.sleep(600)
    r.store_families = slow
"""
#: A model load exits 7: a check that must come first did not.
NO_MODEL = """
    from csae.shared.lm import models
    from csae.evaluate.lm import passes
    def loaded(*a, **k):
        os._exit(7)
    models.load_model = passes.load_lm = loaded
"""
#: Prints the verify bar's final count and total when it closes.
VERIFY_BAR = """
    import tqdm
    class Bar(tqdm.tqdm):
        def close(self):
            if self.desc == "verify":
                print(f"verify bar {self.n} of {self.total}", file=sys.stderr)
            super().close()
    tqdm.tqdm = Bar
"""


def sae_tensors(layer_dir: Path) -> dict[str, list[float]]:
    """The SAE's and head's tensors (exact values)."""
    out = {}
    for name in ("sae_weights.safetensors", "head.safetensors"):
        out.update({f"{name}:{k}": v.flatten().tolist() for k, v in load_file(layer_dir / name).items()})
    return out
