"""Typed options built from keyword arguments: one check, so that a misspelt option fails at once,
naming every option there is (Kronfluence's arguments are the model)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from .errors import ConfigurationError

T = TypeVar("T")


def options_from_kwargs(cls: type[T], kwargs: dict[str, Any], *, what: str, besides: str) -> T:
    """cls(**kwargs) for a dataclass of options; ConfigurationError naming the unknown ones, the
    known ones and the other arguments (`besides`) of `what`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ConfigurationError(f"{what} got unexpected argument(s) {unknown}; its options are {sorted(names)} "
                                 f"besides {besides}.")
    return cls(**kwargs)
