"""Batch valuation on Ray Data (``pip install 'forvalue[ray]'``): the actor pool and its Python
entry points; ``forvalue score --ray`` is in bindings/cli/ray_job.py."""

from .pool import build_covariance, build_reference, read_dataset, score_dataset

__all__ = ["build_covariance", "build_reference", "read_dataset", "score_dataset"]
