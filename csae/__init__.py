"""csae: Contrastive Sparse Autoencoders on cached language-model activations.

The stages live in their own folders and are installed under this package (pyproject.toml maps them):
`csae.harvest`, `csae.train`, `csae.evaluate`, and what they share, `csae.shared`. They meet only through
their files (the activation store, checkpoint directories, metrics). This package adds the `csae` command
(`csae.cli`) and the Python API (`csae.api`: harvest, train, evaluate, load_sae).
"""

from csae.shared.version import __version__

__all__ = ["__version__"]
