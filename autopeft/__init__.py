"""autopeft: multi-objective Bayesian search over parameter-efficient fine-tuning configurations."""

__version__ = "0.1.0"

from autopeft.loading import load  # light: torch is imported on the first call

__all__ = ["__version__", "load"]
