"""vistune: visual instruction tuning (LLaVA, Liu et al., NeurIPS 2023) as software people use."""

__version__ = "0.1.0"
