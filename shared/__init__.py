"""Pieces every stage uses: configs, the model and corpus registries, and the store schema."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
