"""listenerd: streams DataSift, Salesforce and Pusher events into an engine."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version


def version() -> str:
    """The installed package's version; `0+unknown` in a source tree that was never installed."""
    try:
        return _package_version("listenerd")
    except PackageNotFoundError:
        return "0+unknown"
