"""Revati: predict LLM serving speed on GPUs you do not have."""

__version__ = "0.1.0"
