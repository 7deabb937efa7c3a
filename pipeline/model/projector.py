"""The LLaVA vision→language projector: ``linear``, ``mlp{N}x_gelu`` or ``identity``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .constants import projector_depth
from .errors import ConfigError


class IdentityMap(nn.Module):
    """Projector of type ``identity``: returns the tower features unchanged."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x

    @property
    def config(self) -> dict[str, str]:
        return {"mm_projector_type": "identity"}


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def build_vision_projector(config: Any, delay_load: bool = False, **kwargs: Any) -> nn.Module:
    """Build the projector described by ``config`` (an object or a dict).

    Reads ``mm_projector_type`` (default ``linear``), ``mm_hidden_size`` (input width) and
    ``hidden_size`` (output width). ``mlp{N}x_gelu`` is N linear layers with GELU between them.
    An unknown type raises ``ValueError`` naming the valid ones.
    """
    projector_type = _get(config, "mm_projector_type", "linear")
    depth = projector_depth(projector_type)
    if projector_type == "identity":
        return IdentityMap()
    mm_hidden_size = _get(config, "mm_hidden_size")
    hidden_size = _get(config, "hidden_size")
    if mm_hidden_size is None or hidden_size is None:
        raise ConfigError(
            f"Projector {projector_type!r} needs mm_hidden_size and hidden_size, got "
            f"mm_hidden_size={mm_hidden_size!r}, hidden_size={hidden_size!r}"
        )
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    modules: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, depth):
        modules.append(nn.GELU())
        modules.append(nn.Linear(hidden_size, hidden_size))
    return nn.Sequential(*modules)
