"""Shard schema and writers, per-kind pipelines, M3 degradations and the mixing DataModule.

The names below are imported on first use (PEP 562), so `ditfuse shards --help`
(ditfuse/commands/shards.py) does not pay for lightning and torch.
"""

from __future__ import annotations

import importlib

_LAZY = {"DEFAULT_RATIOS": "datamodules.datamodule", "DiTFuseDataModule": "datamodules.datamodule",
         "M3Config": "datamodules.m3", "M3Result": "datamodules.m3", "m3_pair": "datamodules.m3",
         "KINDS": "datamodules.schema"}

__all__ = ["DEFAULT_RATIOS", "KINDS", "DiTFuseDataModule", "M3Config", "M3Result", "m3_pair"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
