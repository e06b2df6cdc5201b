"""Flux.1's flow-matching schedule: its noise levels shift towards noise by ``mu``, which grows
with the image's token count (0.5 at 256 tokens, 1.15 at 4096, linear between); sampled by
:class:`~controlnet.families.flow_match.FlowMatchSampler`."""

from __future__ import annotations

from typing import Any

__all__ = ["FLUX_SCHEDULE"]

#: Flux.1's scheduler config (diffusers' scheduler_config.json of FLUX.1-dev)
FLUX_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
