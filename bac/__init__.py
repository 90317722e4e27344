"""bac: Block-wise Adaptive Caching and the control runtime for diffusion policies.

This package sits at the ground floor: it imports torch and numpy only, never a model or env of ours.
"""
from bac.sampling import StepCursor, denoise

__all__ = ["StepCursor", "denoise"]
__version__ = "0.1.0"
