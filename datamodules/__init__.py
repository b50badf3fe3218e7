"""Shard schema and writers, per-kind pipelines, M3 degradations and the mixing DataModule."""

from datamodules.datamodule import DEFAULT_RATIOS, DiTFuseDataModule
from datamodules.m3 import M3Config, M3Result, m3_pair
from datamodules.schema import KINDS

__all__ = ["DEFAULT_RATIOS", "KINDS", "DiTFuseDataModule", "M3Config", "M3Result", "m3_pair"]
