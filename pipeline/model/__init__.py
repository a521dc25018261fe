"""Backbone models."""

from pipeline.model.transformer import Backbone, count_parameters

__all__ = ["Backbone", "count_parameters"]
