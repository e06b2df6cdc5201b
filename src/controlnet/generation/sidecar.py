"""What a generation leaves on disk: its images, a grid, and a JSON sidecar to replay it from.

The sidecar holds the request as run (seed resolved), the full prompt, and the SHA-256 of every
file the result depends on (base model, VAE, LoRAs, ControlNets, condition and init images,
mask, captioner).
Replaying checks those digests first, so a changed file is an error, not a silent different image.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..imageio import atomic_write_bytes, make_grid, save_png, sha256_file
from ..schema import Kind, files
from .generate import GenerationResult
from .request import GenerationRequest

__all__ = ["Record", "input_files", "read_sidecar", "verify_inputs", "write_outputs"]

SIDECAR_FORMAT = "controlnet-generation/1"


def input_files(request: GenerationRequest) -> dict[str, str]:
    """Every file the request reads, by the parameter that names it ("base", "controls[0].image")."""
    return files(request, (Kind.MODEL, Kind.IMAGE, Kind.MASK, Kind.FILE))


def _next_prefix(out_dir: Path, seed: int, label: str | None) -> str:
    taken = [int(m.group(1)) for p in out_dir.glob("*.json") if (m := re.match(r"(\d{5})-", p.name))]
    prefix = f"{max(taken, default=-1) + 1:05d}-{seed}"
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}" if label else prefix


def write_outputs(result: GenerationResult, out_dir: str | Path, *, label: str | None = None) -> Path:
    """Write ``PREFIX_i.png`` per sample, ``PREFIX_grid.png`` (conditions | samples) and
    ``PREFIX.json``; return the sidecar's path. PREFIX is a running number, the seed and
    ``label`` (a batch item's input name) when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    req = result.request
    assert req.seed is not None
    prefix = _next_prefix(out, req.seed, label)
    images = []
    for i, img in enumerate(result.images):
        path = save_png(img, out / f"{prefix}_{i}.png")
        images.append({"file": path.name, "seed": result.seeds[i], "sha256": sha256_file(path)})
    grid = save_png(make_grid([[*result.conditions, *result.images]]), out / f"{prefix}_grid.png")
    record = {
        "format": SIDECAR_FORMAT,
        "controlnet_version": __version__,
        "request": req.to_dict(),
        "prompt": result.prompt,
        "inputs": {k: {"path": v, "sha256": sha256_file(v)} for k, v in input_files(req).items()},
        "outputs": {"images": images, "grid": grid.name},
        "seconds": round(result.seconds, 3),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": req.device,
        },
    }
    sidecar = out / f"{prefix}.json"
    atomic_write_bytes(sidecar, (json.dumps(record, indent=2) + "\n").encode())
    return sidecar


@dataclass
class Record:
    request: GenerationRequest
    inputs: dict[str, dict[str, str]]
    outputs: dict[str, Any]
    path: Path


def read_sidecar(path: str | Path) -> Record:
    """Parse a sidecar; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such sidecar file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON sidecar ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: not a generation sidecar (expected format {SIDECAR_FORMAT!r})")
    try:
        # written before the field existed: those prompts were read as plain text
        request = GenerationRequest.from_dict({"prompt_syntax": "plain", **data["request"]})
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad request in sidecar ({e})") from None
    return Record(request, data.get("inputs", {}), data.get("outputs", {}), path)


def verify_inputs(record: Record) -> None:
    """Raise ValueError naming each input file that is missing or no longer has its recorded digest."""
    problems = []
    for name, entry in record.inputs.items():
        p = Path(entry["path"])
        if not p.exists():
            problems.append(f"{name} {p} is missing")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{name} {p} has changed since the sidecar was written")
    if problems:
        raise ValueError(f"{record.path}: cannot replay: " + "; ".join(problems))
