"""The generation settings a run starts from, before the user's own: those its base model
carries (our format's metadata, such as the bundled model's guidance of 1.5), else the schema's
defaults (SD's). The same weights therefore behave alike whether named by flag, served, converted
or left to the bundled default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundled import BUNDLED_BASE, bundled_path
from ..families import generation_settings
from ..schema import check_fields, from_dict
from .request import GenerationRequest

__all__ = ["MODEL_SETTINGS", "check_settings", "model_settings"]

#: the request fields a model may set for itself (how it samples best, what its prompts were)
MODEL_SETTINGS = (
    "guidance",
    "added_prompt",
    "negative_prompt",
    "prompt_syntax",
    "clip_skip",
    "sampler",
    "timestep_spacing",
    "eta",
    "steps",
    "resolution",  # the side it was made for (its native size)
)


def model_settings(base: str | None) -> dict[str, Any]:
    """The settings the base model at ``base`` (None: the bundled one) carries, checked against
    the request schema; {} for a model that carries none (or a path that is not there: the
    request's check names it). ValueError naming the file for settings a model may not set or
    values out of their bounds."""
    if base is None:
        try:
            base = str(bundled_path(BUNDLED_BASE))
        except FileNotFoundError:  # a build without the bundled model: the load says so
            return {}
    if not Path(base).exists():
        return {}
    return check_settings(generation_settings(base), base)


def check_settings(settings: dict[str, Any], where: str) -> dict[str, Any]:
    """``settings`` if they are a model's to set (:data:`MODEL_SETTINGS`) and within the request
    schema's types and bounds; ValueError naming ``where`` (the file, or the flag) otherwise."""
    unknown = sorted(set(settings) - set(MODEL_SETTINGS))
    if unknown:
        raise ValueError(
            f"{where}: generation settings {', '.join(unknown)} are not a model's to set "
            f"(a model may set {', '.join(MODEL_SETTINGS)})"
        )
    try:
        check_fields(from_dict(GenerationRequest, settings))
    except ValueError as e:
        raise ValueError(f"{where}: generation settings: {e}") from None
    return settings
