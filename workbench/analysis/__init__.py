"""Analyses: pure functions over a model and data, returning tidy tables."""

from .dla import DLAResult, direct_logit_attribution, dla_exactness

__all__ = ["DLAResult", "direct_logit_attribution", "dla_exactness"]
