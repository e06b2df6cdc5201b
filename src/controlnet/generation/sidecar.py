"""What a generation leaves on disk: its images, a grid, and a JSON sidecar to replay it from.

The sidecar holds the request as run (seed resolved), the full prompt, and the SHA-256 of every
file the result depends on (base model, VAE, LoRAs, ControlNets, condition and init images,
mask, captioner).
Replaying checks the digest of every file it reads first, so a changed file is an error, not a
silent different image.

Paths: a file inside the sidecar's folder is recorded relative to it, any other by its absolute
path (or, on a server, by the name it offers it under: clients never see the server's paths), so a
replay works from any working folder and a copied output folder keeps its uploads. Sidecars of the
first format recorded paths as typed, relative to the working folder of the run.
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..imageio import atomic_write_bytes, make_grid, save_png, sha256_file
from ..schema import Kind, check_fields, files, map_files
from .generate import GenerationResult
from .request import GenerationRequest

__all__ = ["Record", "input_files", "read_sidecar", "verify_inputs", "write_outputs"]

SIDECAR_FORMAT = "controlnet-generation/2"
#: the first format: paths as typed, relative to the working folder of the run
SIDECAR_FORMAT_1 = "controlnet-generation/1"
FILE_KINDS = (Kind.MODEL, Kind.IMAGE, Kind.MASK, Kind.FILE)
#: a JSON sidecar bigger than this is not one of ours (a request with 100 controls is ~100 kB)
MAX_SIDECAR_BYTES = 16 * 2**20


def input_files(request: GenerationRequest) -> dict[str, str]:
    """Every file the request reads, by the parameter that names it ("base", "controls[0].image")."""
    return files(request, FILE_KINDS)


def _recorder(folder: Path, names: Mapping[str, str] | None) -> Callable[[str], str]:
    """How a path is written into a sidecar in ``folder``: relative to it when inside it, else
    absolute; with ``names`` (a server's), a path outside the folder by its name there (the
    file name when it has none)."""
    root = folder.resolve()

    def record(path: str) -> str:
        p = Path(path).resolve()
        if p.is_relative_to(root):
            return p.relative_to(root).as_posix()
        if names is not None:
            return names.get(str(p), p.name)
        return str(p)

    return record


def _recorded_request(req: GenerationRequest, record: Callable[[str], str]) -> GenerationRequest:
    """``req`` with its file paths as the sidecar records them; annotator weights given as a
    path too (a bare name is looked up in the annotator folder, and stays as it is)."""
    req = map_files(req, FILE_KINDS, lambda _, path: record(path))
    controls = []
    for c in req.controls:
        weights = c.params.get("weights")
        if isinstance(weights, str) and Path(weights).is_absolute():
            c = replace(c, params={**c.params, "weights": record(weights)})
        controls.append(c)
    return replace(req, controls=controls)


def _next_prefix(out_dir: Path, seed: int, label: str | None) -> str:
    taken = [int(m.group(1)) for p in out_dir.glob("*.json") if (m := re.match(r"(\d{5})-", p.name))]
    prefix = f"{max(taken, default=-1) + 1:05d}-{seed}"
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}" if label else prefix


def write_outputs(
    result: GenerationResult,
    out_dir: str | Path,
    *,
    label: str | None = None,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write ``PREFIX_i.png`` per sample, ``PREFIX_grid.png`` (conditions | samples) and
    ``PREFIX.json``; return the sidecar's path. PREFIX is a running number, the seed and
    ``label`` (a batch item's input name) when given. ``names``: absolute path -> the name to
    record instead (a server's; see the module's doc)."""
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
    where = _recorder(out, names)
    record = {
        "format": SIDECAR_FORMAT,
        "controlnet_version": __version__,
        "request": _recorded_request(req, where).to_dict(),
        "prompt": result.prompt,
        "inputs": {k: {"path": where(v), "sha256": sha256_file(v)} for k, v in input_files(req).items()},
        "outputs": {"images": images, "grid": grid.name},
        "seconds": round(result.seconds, 3),
        "environment": environment(req.device),
    }
    if result.stopped_at is not None:  # the images are what it had when it was stopped
        done, total = result.stopped_at
        record["outputs"]["stopped"] = {"after_step": done, "of": total}
    sidecar = out / f"{prefix}.json"
    atomic_write_bytes(sidecar, (json.dumps(record, indent=2) + "\n").encode())
    return sidecar


def environment(device: str) -> dict[str, Any]:
    """What, besides the request, decides an image's last bits: library versions, the device, and
    on the CPU its instruction set and thread count (a replay elsewhere names what differs)."""
    import numpy
    import PIL

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device == "cpu":
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cpu_threads"] = torch.get_num_threads()
    elif device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def environment_changes(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """'name: recorded -> now' for every environment fact both record and that differs."""
    return [f"{k}: {recorded[k]} -> {now[k]}" for k in recorded if k in now and recorded[k] != now[k]]


@dataclass
class Record:
    request: GenerationRequest
    inputs: dict[str, dict[str, str]]
    outputs: dict[str, Any]
    path: Path
    environment: dict[str, Any] = field(default_factory=dict)


def read_sidecar(path: str | Path) -> Record:
    """Parse a sidecar, its relative paths resolved against its folder (the first format's: as
    they were typed); errors name the file and what is wrong with it, in one line."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError(f"{path}: over {MAX_SIDECAR_BYTES // 2**20} MB, not a generation sidecar")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such sidecar file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, not a sidecar file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON sidecar ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: not a generation sidecar (JSON nested too deep)") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in (SIDECAR_FORMAT, SIDECAR_FORMAT_1):
        raise ValueError(f"{path}: not a generation sidecar (expected format {SIDECAR_FORMAT!r})")
    try:
        # written before the field existed: those prompts were read as plain text
        request = GenerationRequest.from_dict({"prompt_syntax": "plain", **data["request"]})
        request = check_fields(request)  # bounds too: nothing out of range reaches any work
    except KeyError as e:
        raise ValueError(f"{path}: bad request in sidecar (no field {e})") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: bad request in sidecar ({e})") from None
    inputs, outputs = data.get("inputs", {}), data.get("outputs", {})
    if not isinstance(inputs, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
        for e in inputs.values()
    ):
        raise ValueError(f"{path}: bad inputs in sidecar (expected name -> {{path, sha256}})")
    if not isinstance(outputs, dict):
        raise ValueError(f"{path}: bad outputs in sidecar (expected an object)")
    if fmt == SIDECAR_FORMAT:
        folder = path.parent

        def here(p: str) -> str:
            return p if Path(p).is_absolute() else str(folder / p)

        request = map_files(request, FILE_KINDS, lambda _, p: here(p))
        inputs = {k: {**e, "path": here(e["path"])} for k, e in inputs.items()}
    env = data.get("environment", {})
    return Record(request, inputs, outputs, path, env if isinstance(env, dict) else {})


def verify_inputs(record: Record, request: GenerationRequest | None = None) -> list[str]:
    """Check every file ``request`` (default: the recorded one) reads against the digest the
    sidecar records for it: ValueError naming each file that is missing, changed, or has no
    recorded digest. A file the request names in place of the recorded one (an override) may
    differ: its input names are returned (the new run records them)."""
    request = request or record.request
    recorded = input_files(record.request)
    problems, changed = [], []
    for name, p in input_files(request).items():
        entry = record.inputs.get(name)
        replaced = recorded.get(name) != p
        if not Path(p).exists():
            problems.append(f"{name} {p} is missing")
        elif entry is None and not replaced:
            problems.append(f"{name} {p} has no recorded digest, so it cannot be checked")
        elif entry is None or sha256_file(p) != entry["sha256"]:
            if replaced:
                changed.append(name)
            else:
                problems.append(f"{name} {p} has changed since the sidecar was written")
    if problems:
        raise ValueError(f"{record.path}: cannot replay: " + "; ".join(problems))
    return changed
