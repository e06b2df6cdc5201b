"""Learned estimators that transformers implements (depth, semantic segmentation), from local
folders only.

A folder is what ``save_pretrained`` writes or a Hub snapshot: ``config.json``, the weights
(``model.safetensors``) and optionally ``preprocessor_config.json``. It is loaded with
``local_files_only=True``: nothing downloads; a tensor missing from the weights is an error (not
a silent random initialisation). The image is prepared here from the folder's
preprocessor settings (size, aspect rule, multiple, mean and std), with per-architecture defaults
when the file is absent, so no image-processor class is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from .weights import cached, default_device, find_weights

__all__ = ["load_estimator", "pixel_values", "run_estimator"]

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# model_type -> (height, width, keep aspect ratio, multiple, mean, std)
_DEFAULTS: dict[str, tuple[int, int, bool, int, tuple[float, ...], tuple[float, ...]]] = {
    "dpt": (384, 384, False, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "depth_anything": (518, 518, True, 14, *_IMAGENET),
}
_SEGMENTATION_DEFAULT = (512, 512, False, 32, *_IMAGENET)

TASKS = {"depth": "AutoModelForDepthEstimation", "segmentation": "AutoModelForSemanticSegmentation"}


def _load(path: str, mtime: float, task: str) -> tuple[nn.Module, dict[str, Any]]:
    import transformers

    auto = getattr(transformers, TASKS[task])
    name = Path(path).name
    try:
        model, info = auto.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load a transformers {task} model from {name}: {e}") from None
    # transformers fills missing tensors with random values and only warns: refuse that here
    bad = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
    if bad:
        raise ValueError(
            f"incomplete weights in {name}: {len(bad)} tensors missing or of the wrong shape "
            f"(e.g. {', '.join(bad[:3])})"
        )
    prep_file = Path(path) / "preprocessor_config.json"
    prep = json.loads(prep_file.read_text()) if prep_file.is_file() else {}
    return model.float().eval().to(default_device()), prep


_load_depth = cached(lambda path, mtime: _load(path, mtime, "depth"))
_load_segmentation = cached(lambda path, mtime: _load(path, mtime, "segmentation"))


def load_estimator(weights: str, task: str, *, what: str, get: str) -> tuple[nn.Module, dict[str, Any]]:
    """(model, preprocessor settings) from a local transformers folder; FileNotFoundError naming
    what to get when the folder is missing."""
    path = find_weights(weights, what=what, get=get, folder=True)
    return (_load_depth if task == "depth" else _load_segmentation)(path)


def _settings(model: nn.Module, prep: dict[str, Any]) -> tuple[int, int, bool, int, np.ndarray, np.ndarray]:
    h, w, keep, multiple, mean, std = _DEFAULTS.get(model.config.model_type, _SEGMENTATION_DEFAULT)
    size = prep.get("size")
    if isinstance(size, int):
        h = w = size
    elif isinstance(size, dict):
        if "height" in size and "width" in size:
            h, w = int(size["height"]), int(size["width"])
        elif "shortest_edge" in size:
            h = w = int(size["shortest_edge"])
            keep = True
    keep = bool(prep.get("keep_aspect_ratio", keep))
    multiple = int(prep.get("ensure_multiple_of") or multiple)
    if prep.get("do_normalize", True):
        mean, std = prep.get("image_mean", mean), prep.get("image_std", std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return h, w, keep, multiple, np.asarray(mean, np.float32), np.asarray(std, np.float32)


def pixel_values(image: np.ndarray, model: nn.Module, prep: dict[str, Any]) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (1, 3, h, w) float32 input for ``model``.

    Size rule (DPT's): scale to the target height and width; with ``keep_aspect_ratio`` use for
    both sides the one scale closest to 1; round each side to the nearest multiple.
    """
    th, tw, keep, multiple, mean, std = _settings(model, prep)
    ih, iw = image.shape[:2]
    sh, sw = th / ih, tw / iw
    if keep:
        sh = sw = sw if abs(1 - sw) < abs(1 - sh) else sh
    h = max(multiple, round(sh * ih / multiple) * multiple)
    w = max(multiple, round(sw * iw / multiple) * multiple)
    x = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0
    x = (x - mean) / std
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def run_estimator(image: np.ndarray, model: nn.Module, prep: dict[str, Any]) -> torch.Tensor:
    """The model's dense output resized to the image: depth (H, W) or class logits (C, H, W)."""
    device = next(model.parameters()).device
    out = model(pixel_values=pixel_values(image, model, prep).to(device))
    is_depth = hasattr(out, "predicted_depth")
    y = out.predicted_depth[:, None] if is_depth else out.logits
    mode = "bicubic" if is_depth else "bilinear"
    y = torch.nn.functional.interpolate(y.float(), size=image.shape[:2], mode=mode, align_corners=False)
    return y[0, 0].cpu() if is_depth else y[0].cpu()
