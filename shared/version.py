"""The installed csae's version, recorded in every store and printed by `--version`."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csae")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
