"""Benchmark harness for data-efficient deep learning: protocols, trainer, compute meter, records."""

__version__ = "0.1.0"
