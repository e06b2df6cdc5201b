"""The registry plug-in functions of a transformer family (Flux.1, SD3 / SD3.5): its files are
read by :mod:`controlnet.formats`, which tells each file's family; a family module names itself
and its defaults and takes these functions from :func:`plugin_functions`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..formats import api

__all__ = ["plugin_functions"]


def plugin_functions(
    name: str, label: str, base: type, settings: dict[str, Any]
) -> dict[str, Callable[..., Any]]:
    """detect, generation_settings, load_base, load_controlnet, needs_base, load_vae and
    merge_loras of the family ``name`` (see :mod:`controlnet.families`)."""

    def detect(path: str | Path) -> str:
        d = api.detect(path)
        if d.family != name:
            raise CheckpointError(f"{path}: not a {label} model ({d.layout})")
        return d.layout

    def generation_settings(path: str | Path) -> dict[str, Any]:
        return dict(settings) if "base" in api.detect(path).kinds else {}

    def load_base(path: str | Path, *, dtype: Any = None) -> Any:
        model = api.load_base(path, dtype=dtype)
        assert isinstance(model, base)
        return model

    def load_controlnet(path: str | Path, *, dtype: Any = None, base_network: Any = None) -> Any:
        return api.load_controlnet(path, dtype=dtype)

    def needs_base(path: str | Path) -> bool:
        return False

    def load_vae(path: str | Path, *, base: Any) -> Any:
        raise ValueError(f"{path}: a separate VAE for a {label} model is not supported yet")

    def merge_loras(base: Any, loras: Any) -> None:
        raise ValueError(f"LoRA files for {label} models are not supported yet")

    return {
        "detect": detect,
        "generation_settings": generation_settings,
        "load_base": load_base,
        "load_controlnet": load_controlnet,
        "needs_base": needs_base,
        "load_vae": load_vae,
        "merge_loras": merge_loras,
    }
