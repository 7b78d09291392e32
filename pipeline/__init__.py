"""Simulation, transforms and Hub publishing for Stable Alignment (arXiv 2305.16960)."""

__version__ = "0.1.0"
