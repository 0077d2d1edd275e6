"""Benchmarks through lm-evaluation-harness on a checkpoint where it stands: `lm.QwenLM` (lm-eval's model
interface over the project's forward and generation engine) and `harness` (tasks run, results flattened)."""
