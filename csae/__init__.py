"""csae: Contrastive Sparse Autoencoders on cached language-model activations.

The stages live in their own folders and are installed under this package (pyproject.toml maps them):
`csae.harvest`, `csae.train`, `csae.evaluate`, and what they share, `csae.shared`. They meet only through
their files (the activation store, checkpoint directories, metrics). This package adds the `csae` command
(`csae.cli`) and the Python API (`csae.api`: harvest, train, evaluate, load_sae).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
