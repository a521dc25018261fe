"""Backbone models."""

from pipeline.model.transformer import Backbone, count_parameters, parameter_count

__all__ = ["Backbone", "count_parameters", "parameter_count"]
