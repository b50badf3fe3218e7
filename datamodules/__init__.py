"""Shard schema and writers, per-kind pipelines, M3 degradations and the mixing DataModule."""
