"""Measurements: fusion metrics (`metrics`), segmentation / control scores (`task_metrics`) and
no-reference IQA (`iqa`, optional pyiqa). Imports nothing of the project.
"""
