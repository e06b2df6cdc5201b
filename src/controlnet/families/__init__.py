"""Base-model families, as plug-ins: the registry that loads a model of whichever family a file
holds.

A family is a folder here (``sd/``: the Stable Diffusion UNets) with a ``plugin`` module that
implements the functions below for its files, and a class implementing the base-model protocol
(:class:`~controlnet.families.protocol.BaseModel`). Registering a family is one entry in
:data:`PLUGINS`; generation, the command line, the API and the web app then load and run its
models without a change, since they only name files (loaded here) and call the protocol.

A plug-in module provides:

- ``NAME`` and ``LABEL``; ``BASE``: its base-model class;
- ``detect(path) -> str``: what the file or folder holds, or CheckpointError saying why it is not
  one of this family's (headers and key names only, no weights);
- ``load_base(path, *, dtype)``, ``load_controlnet(path, *, dtype, base_network)``,
  ``needs_base(path)`` (a ControlNet stored as changes to its base: a Control-LoRA);
- ``load_vae(path, *, base)`` and ``merge_loras(base, loras)`` for the files that modify a base;
- optionally ``generation_settings(path) -> dict``: the settings a base model's file carries
  (guidance, prompts, ...: :mod:`controlnet.generation.defaults`).

or holds an object that does, as ``PLUGIN``: the transformer families each hold a
:class:`.dit_plugin.DiTPlugin` (one interface; a family gives its name, class and defaults).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "PLUGINS",
    "generation_settings",
    "load_base",
    "load_controlnet",
    "load_vae",
    "merge_loras",
    "needs_base",
    "plugin_for",
]

#: family name -> its plug-in module (imported when first needed)
PLUGINS: dict[str, str] = {
    "sd": "controlnet.families.sd.plugin",
    "flux": "controlnet.families.flux.plugin",
    "sd3": "controlnet.families.sd3.plugin",
    "qwenimage": "controlnet.families.qwenimage.plugin",
    "zimage": "controlnet.families.zimage.plugin",
}


def _plugins() -> list[Any]:
    modules = [importlib.import_module(module) for module in PLUGINS.values()]
    return [getattr(m, "PLUGIN", m) for m in modules]


def plugin_for(path: str | Path) -> Any:
    """The plug-in of the family whose files ``path`` is one of; CheckpointError naming the file
    and what each family found otherwise."""
    reasons = []
    for plugin in _plugins():
        try:
            plugin.detect(path)
            return plugin
        except CheckpointError as e:
            reasons.append((plugin, e))
    # a file no family's layout reader takes is refused alike by each: say it once
    if len({str(e) for _, e in reasons}) == 1:
        raise reasons[0][1]
    raise CheckpointError("; ".join(f"{p.LABEL}: {e}" for p, e in reasons))


def _plugin_of_model(base: Any) -> Any:
    for plugin in _plugins():
        if isinstance(base, plugin.BASE):
            return plugin
    raise TypeError(f"{type(base).__name__} is not the base model of a registered family")


def load_base(path: str | Path, *, dtype: Any = None) -> Any:
    """The base model at ``path``, of whichever family it is."""
    return plugin_for(path).load_base(path, dtype=dtype)


def generation_settings(path: str | Path) -> dict[str, Any]:
    """The generation settings the base model at ``path`` carries (a family whose files carry
    none need not say: {})."""
    plugin = plugin_for(path)
    read = getattr(plugin, "generation_settings", None)
    return dict(read(path)) if read is not None else {}


def load_controlnet(path: str | Path, *, dtype: Any = None, base_network: Any = None) -> Any:
    """The ControlNet at ``path``; ``base_network``: the network of the base it runs beside, which a
    ControlNet stored as changes to it (:func:`needs_base`) is built on."""
    return plugin_for(path).load_controlnet(path, dtype=dtype, base_network=base_network)


def needs_base(path: str | Path) -> bool:
    """Whether the ControlNet at ``path`` is built on its base model's network (a Control-LoRA)."""
    return bool(plugin_for(path).needs_base(path))


def load_vae(path: str | Path, *, base: Any) -> Any:
    """The VAE at ``path``, read into the architecture of ``base``'s, in its dtype."""
    return _plugin_of_model(base).load_vae(path, base=base)


def merge_loras(base: Any, loras: Sequence[tuple[str, float]]) -> None:
    """Merge each LoRA (file, scale) into ``base``'s weights, in place."""
    _plugin_of_model(base).merge_loras(base, loras)
