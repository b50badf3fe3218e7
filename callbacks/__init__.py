"""Lightning callbacks: sample grids, fusion and IQA metrics, data-mix monitoring."""

from callbacks.ema import EMA
from callbacks.fusion_metrics import FusionMetrics
from callbacks.hparams import HParamsLogger
from callbacks.iqa import IQAMetrics
from callbacks.mix_monitor import MixMonitor
from callbacks.samples import SampleGrid
from callbacks.seeding import RankSeed

__all__ = ["EMA", "FusionMetrics", "HParamsLogger", "IQAMetrics", "MixMonitor", "RankSeed", "SampleGrid"]
