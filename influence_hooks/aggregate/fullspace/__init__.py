"""Full-parameter-space influence: curvature recomputed from the model (`dit(..., curvature="exact" | "ggn")`)."""

from .exact import exact_dit

__all__ = ["exact_dit"]
