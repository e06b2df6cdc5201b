"""The paper's "automatic prompt": a caption of the condition's source image from a local
BLIP-style captioner (transformers' BlipForConditionalGeneration). Weights are a folder the user
downloads once (e.g. Salesforce/blip-image-captioning-base); nothing is fetched here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["Captioner"]

_HELP = (
    "download a BLIP captioning model (e.g. Salesforce/blip-image-captioning-base) as a folder "
    "with config.json, the weights and the processor files, and pass that folder"
)


class Captioner:
    """``Captioner(folder)(image) -> str``; image is (H, W, 3) uint8 RGB."""

    def __init__(self, folder: str | Path, device: str = "cpu", max_new_tokens: int = 30) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"captioner folder {folder} has no config.json: {_HELP}")
        try:
            self.processor = BlipProcessor.from_pretrained(folder, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"captioner folder {folder} could not be loaded ({e}); {_HELP}") from None
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> str:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()
