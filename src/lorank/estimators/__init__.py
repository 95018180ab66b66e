"""Estimators: each measures one thing about the model and data and returns Evidence."""

from lorank.estimators.base import Evidence

__all__ = ["Evidence"]
