"""The workbench's version: written into every run's config (``workbench_version``) and read by the
packaging metadata (pyproject.toml), so it is stated once."""

__version__ = "0.1.0"
