"""The package version, written once: ``pyproject.toml`` reads it from here (setuptools'
``attr:``), the daemon protocol's hello carries it, and bench JSON records it."""

__version__ = "0.1.0"
