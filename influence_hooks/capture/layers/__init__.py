"""Layer rules, one file per family; importing this package registers them all."""

from influence_hooks.capture.layers import (  # noqa: F401
    conv,
    embedding,
    gpt2,
    linear,
    norm,
    refused,
)
