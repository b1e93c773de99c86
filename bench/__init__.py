"""Measurements of the pipeline: stage speed against baselines (stages_bench.py), data preparation speed and
OCR quality; recorded outputs in bench/results/."""
