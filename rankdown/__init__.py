"""rankdown: shrink a Llama-family model for one task by low-rank factorization, and ship it."""

__version__ = "0.1.0"
