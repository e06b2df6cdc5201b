"""The registry plug-in of a transformer family (Flux.1, SD3 / SD3.5, Qwen-Image, Z-Image): its
files are read by :mod:`controlnet.formats`, which tells each file's family, so a family's plug-in
module only names itself, its base class and how it samples (:class:`DiTPlugin`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..formats import api

__all__ = ["DiTPlugin"]


class DiTPlugin:
    """The registry's interface (:mod:`controlnet.families`) for the transformer family ``name``:
    every file through :mod:`controlnet.formats`; its bases sample with Euler, ``steps`` steps
    and ``guidance`` against ``negative_prompt``, plain prompts and nothing added to them."""

    def __init__(
        self, name: str, label: str, base: type, *, steps: int, guidance: float, negative_prompt: str = ""
    ) -> None:
        self.NAME, self.LABEL, self.BASE = name, label, base
        self.SETTINGS: dict[str, Any] = {
            "sampler": "euler",
            "steps": steps,
            "guidance": guidance,
            "negative_prompt": negative_prompt,
            "added_prompt": "",
            "prompt_syntax": "plain",
        }

    def detect(self, path: str | Path) -> str:
        d = api.detect(path)
        if d.family != self.NAME:
            raise CheckpointError(f"{path}: not a {self.LABEL} model ({d.layout})")
        return d.layout

    def generation_settings(self, path: str | Path) -> dict[str, Any]:
        """The family's own settings, and over them those the file carries (our format's)."""
        return {**self.SETTINGS, **api.generation_settings(path)} if "base" in api.detect(path).kinds else {}

    def load_base(self, path: str | Path, *, dtype: Any = None) -> Any:
        model = api.load_base(path, dtype=dtype)
        assert isinstance(model, self.BASE)
        return model

    def load_controlnet(self, path: str | Path, *, dtype: Any = None, base_network: Any = None) -> Any:
        return api.load_controlnet(path, dtype=dtype)

    def needs_base(self, path: str | Path) -> bool:
        return False

    def load_vae(self, path: str | Path, *, base: Any) -> Any:
        raise ValueError(f"{path}: a separate VAE for a {self.LABEL} model is not supported yet")

    def merge_loras(self, base: Any, loras: Any) -> None:
        raise ValueError(f"LoRA files for {self.LABEL} models are not supported yet")
