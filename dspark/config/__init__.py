"""Typed, strict schemas for recipes, candidates and bundles (unknown keys are errors)."""

from dspark.config.base import StrictModel, format_validation_error

__all__ = ["StrictModel", "format_validation_error"]
