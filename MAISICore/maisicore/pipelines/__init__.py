"""Pipelines: check a request, sample, decode."""
