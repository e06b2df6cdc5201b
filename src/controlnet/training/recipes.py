"""A training run assembled from its options: the base model, the data, the objective, validation
and the final export. ``controlnet train`` is a thin shell over :func:`run_training`.

Objectives: ``controlnet`` (the paper), ``adapter`` (a T2I-Adapter for a UNet base, the same loss
on the same data), the ablation variants ``gaussian``, ``lite`` and ``concat`` (see
:mod:`controlnet.training.ablations`), and the two stages of a base model trained from scratch,
``vae`` and ``base`` (how the bundled model was made).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from safetensors.torch import save_file

from ..choices import OBJECTIVES
from ..families.protocol import BaseModel
from ..families.sd.controlnet import ControlNetConfig
from ..text.prompts import long_prompts
from .objectives import BaseObjective, ControlNetObjective, Objective, VaeObjective
from .train import TrainConfig, TrainResult, check_out, train
from .validation import ControlValidator, ImageValidator

__all__ = ["OBJECTIVES", "RunSpec", "architecture", "base_identity", "load_or_build_base", "run_training"]

_CONTROL_OBJECTIVES = ("controlnet", "adapter", "gaussian", "lite", "concat")
#: objectives whose trained model is written in the control models' formats (``--export``)
_EXPORTED = ("controlnet", "adapter", "gaussian")


@dataclass
class RunSpec:
    """Everything beyond the loop's own settings (those are :class:`TrainConfig`)."""

    data: str
    objective: str = "controlnet"
    base: str | None = None  # a base model file/folder; None with ``arch``: a fresh one
    arch: str | None = None  # a preset name (assets/architectures) or a JSON file
    init_controlnet: str | None = None
    hint_channels: int | None = None
    global_pool: bool = False
    #: fields of the family's ControlNet configuration (how many blocks a transformer's copies, a
    #: Union's number of modes, ...), over the architecture preset's
    controlnet_config: dict[str, Any] = field(default_factory=dict)
    control_mode: int | None = None  # a Union ControlNet's mode for the data set's conditions
    sd_locked: bool = True
    only_mid_control: bool = False
    empty_prompt_prob: float | None = None  # default: 0.5 for controls (the paper), 0.1 for a base
    noise_offset: float = 0.0  # offset noise (DiffusionInputs.noise_offset)
    resolution: int | None = None
    annotator: str | None = None
    annotator_params: dict[str, Any] = field(default_factory=dict)
    skip_bad: bool = False
    cache: str | None = None  # folder for VAE latents + prompt embeddings
    validation_steps: int = 20
    validation_guidance: float | None = None  # None: the base model's own (SD's 9 if it has none)
    export: list[str] = field(default_factory=lambda: ["controlnet"])


def architecture(name_or_path: str) -> dict[str, Any]:
    """An architecture preset (``fill50k-tiny``) or JSON file: {"base": BaseConfig, "controlnet": ...}."""
    path = Path(name_or_path)
    if not path.is_file():
        res = resources.files("controlnet").joinpath("assets", "architectures", f"{name_or_path}.json")
        if not res.is_file():
            known = sorted(
                p.name[:-5]
                for p in resources.files("controlnet").joinpath("assets", "architectures").iterdir()
            )
            raise FileNotFoundError(f"no architecture {name_or_path!r}: give a JSON file or one of {known}")
        return json.loads(res.read_text())
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON architecture ({e})") from None


def load_or_build_base(spec: RunSpec, seed: int) -> BaseModel:
    from ..formats import load_base
    from ..formats.build import BaseConfig, fresh_base
    from ..formats.dit_base import SPECS
    from ..formats.dit_fresh import fresh_dit_base

    if spec.base is not None:
        return load_base(spec.base, dtype=torch.float32)
    if spec.arch is None:
        raise ValueError("give a base model (--base) or, to train one from scratch, an architecture (--arch)")
    if spec.objective != "vae":
        raise ValueError("a fresh base (--arch) starts with the 'vae' objective; later stages take --base")
    arch = architecture(spec.arch)["base"]
    if arch.get("family") in SPECS:  # a transformer family's stack
        return fresh_dit_base(arch, seed=seed)
    return fresh_base(BaseConfig.from_dict(arch), seed=seed)


def _controlnet(spec: RunSpec, base: BaseModel) -> torch.nn.Module:
    from .. import families
    from ..families.sd.adapter import T2IAdapter
    from .ablations import LiteControlNet, gaussian_connections

    if spec.init_controlnet is not None:
        cn = families.load_controlnet(spec.init_controlnet, dtype=torch.float32, base_network=base.denoiser)
        if isinstance(cn, T2IAdapter) != (spec.objective == "adapter"):
            held = "a T2I-Adapter" if isinstance(cn, T2IAdapter) else "a ControlNet"
            raise ValueError(
                f"--init-controlnet {spec.init_controlnet}: {held}, not what --objective "
                f"{spec.objective} trains"
            )
        base.check_controlnet(cn, controlnet_name=spec.init_controlnet, base_name=str(spec.base))
        return cn
    if spec.objective == "adapter":
        unet = getattr(base, "unet", None)
        if unet is None:
            raise ValueError(
                f"--objective adapter: T2I-Adapters are made for UNet bases (SD1.x, SD2.x, SDXL); "
                f"{spec.base} is a {base.family.label} model"
            )
        hint_channels = 3 if spec.hint_channels is None else spec.hint_channels
        return T2IAdapter.for_unet(
            dict(unet.config), latent_factor=base.vae_scale_factor, in_channels=hint_channels
        )
    config: dict[str, Any] = dict(architecture(spec.arch).get("controlnet", {})) if spec.arch else {}
    config.update(spec.controlnet_config)
    if spec.global_pool:
        config["global_pool"] = True
    if spec.hint_channels is not None:
        config["hint_channels"] = spec.hint_channels
    if spec.objective == "lite":
        return LiteControlNet(base.unet, ControlNetConfig.from_dict(config))
    cn = base.new_controlnet(config)
    if config:  # what the architecture or --controlnet-config asked for may not fit this base
        given = f"--arch {spec.arch}" if spec.arch else "--controlnet-config"
        base.check_controlnet(cn, controlnet_name=given, base_name=str(spec.base))
    return gaussian_connections(cn) if spec.objective == "gaussian" else cn


def _objective(spec: RunSpec, base: BaseModel) -> Objective:
    from .ablations import ConcatObjective

    if spec.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {spec.objective!r}; expected one of: {', '.join(OBJECTIVES)}")
    control = spec.objective in _CONTROL_OBJECTIVES
    prob = spec.empty_prompt_prob if spec.empty_prompt_prob is not None else (0.5 if control else 0.1)
    if spec.objective == "vae":
        if spec.noise_offset:
            raise ValueError("--noise-offset is a diffusion option; the 'vae' objective adds no noise")
        return VaeObjective(base)
    inputs = {"empty_prompt_prob": prob, "noise_offset": spec.noise_offset}  # DiffusionInputs' options
    if spec.objective == "base":  # (the text encoders train too where the stack has one CLIP alone)
        one_clip = getattr(base, "unet", None) is not None and getattr(base, "text_encoder_2", None) is None
        return BaseObjective(base, train_text_encoder=one_clip, **inputs)
    if spec.objective == "concat":
        return ConcatObjective(base, **inputs)
    return ControlNetObjective(
        base,
        _controlnet(spec, base),
        only_mid_control=spec.only_mid_control,  # type: ignore[arg-type]
        sd_locked=spec.sd_locked,
        control_mode=spec.control_mode,
        **inputs,
    )


def _dataset(
    spec: RunSpec,
    base: BaseModel,
    objective: Objective,
    device: str,
    *,
    progress: bool = True,
    notes: bool = True,
    num_workers: int = 0,
) -> Any:
    """The run's data: its items as they are, or (``--cache``) a latent cache of them, built with
    ``num_workers`` processes reading the images (the run's own loader's count). ``notes``: say
    what was skipped or cut (process 0 of several says it once)."""
    from ..data import open_dataset

    dataset = open_dataset(
        spec.data,
        resolution=spec.resolution,
        annotator=spec.annotator,
        annotator_params=spec.annotator_params or None,
        skip_bad=spec.skip_bad,
    )
    if dataset.skipped and notes:
        print(f"skipped {len(dataset.skipped)} bad entries of {spec.data}:")
        for s in dataset.skipped[:20]:
            print(f"  {s}")
    if spec.objective != "vae":
        if notes:
            _report_long_captions(dataset, spec.data, base)
        if len(dataset):  # a size the base cannot take, named before any work
            size = tuple(dataset[0]["target"].shape[-2:])
            try:
                base.latent_size(size)
            except ValueError as e:
                raise ValueError(f"{spec.data}: {e}; resize the data with --resolution") from None
    if spec.cache is None:
        return dataset
    if spec.objective == "vae":
        raise ValueError("the vae objective trains on pixels: a latent cache (--cache) does not apply")
    from ..data import CachedDataset, build_cache

    build_cache(
        dataset, base, spec.cache, device=device, batch_size=64, num_workers=num_workers, progress=progress
    )
    needs_cond = spec.objective in _CONTROL_OBJECTIVES
    cached = CachedDataset(spec.cache, with_cond=needs_cond)  # build_cache has just checked it
    inputs = getattr(objective, "inputs", None)
    if inputs is not None:
        inputs.empty = cached.empty
    return cached


def _report_long_captions(dataset: Any, where: str, base: BaseModel) -> None:
    """Say, for each text encoder, how many captions its window cuts: training reads each caption
    as one window per encoder (generation's weighted syntax reads long prompts whole)."""
    captions = [dataset.prompt(i) for i in range(len(dataset))]
    distinct = len(set(captions))
    for name, tokenizer, window in base.text_windows():
        long = long_prompts(captions, tokenizer, window)
        if long:
            text, n = max(long.items(), key=lambda kv: kv[1])
            print(
                f"{len(long)} of {distinct} distinct captions in {where} are longer than {name}'s "
                f"{window} tokens; {name} reads the first {window} of each "
                f"(the longest, {n} tokens: {text[:80]!r}{'...' if len(text) > 80 else ''})"
            )


@torch.no_grad()
def _latent_stats(base: BaseModel, dataset: Any, n: int = 512) -> tuple[float, float]:
    """(mean, 1 / std) of the VAE latents over ``n`` items: the shift (for the families that shift
    their latents) and the scaling that give the network zero-mean, unit-variance inputs (SD's
    0.18215 and Flux.1's 0.1159 / 0.3611 were found the same way)."""
    device = next(base.vae.parameters()).device
    idx = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int)
    zs = []
    for chunk in np.array_split(idx, max(1, len(idx) // 32)):
        x = torch.stack([dataset[int(i)]["target"] for i in chunk]).to(device)
        zs.append(base.posterior(x, per_image=False).mean.float().cpu())
    z = torch.cat(zs)
    return float(z.mean()), float(1.0 / z.std())


def _image_side(spec: RunSpec) -> int:
    """The short side of the images a run trains on (its data's, as --resolution resizes them;
    read from the images themselves: a latent cache holds none), to the nearest side generation
    makes (a multiple of 64)."""
    from ..data import open_dataset

    images = open_dataset(spec.data, resolution=spec.resolution, skip_bad=spec.skip_bad)
    return max(64, round(int(min(images[0]["target"].shape[-2:])) / 64) * 64)


def _exporter(spec: RunSpec, base: BaseModel, dataset: Any) -> Any:
    from ..formats import save_base, save_controlnet

    def export(objective: Objective, ema: dict[str, torch.Tensor] | None, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        if ema is not None:  # export the averaged weights
            objective.load_trainable_state({**objective.trainable_state(), **ema})
        if spec.objective in ("vae", "base"):
            if spec.objective == "vae":
                mean, scale = _latent_stats(base, dataset)
                base.vae.register_to_config(scaling_factor=scale)
                if base.vae.config.shift_factor is not None:  # a family that shifts its latents
                    base.vae.register_to_config(shift_factor=mean)
            for m in base.modules().values():
                m.requires_grad_(False).eval()
            # the side it was made for, which it generates by default: its images' short side
            base.settings = {**base.settings, "resolution": _image_side(spec)}
            return save_base(base, out / "base.safetensors", overwrite=True)
        if spec.objective in _EXPORTED:
            cn = objective.controlnet  # type: ignore[attr-defined]
            stem = "adapter" if spec.objective == "adapter" else "controlnet"
            paths: list[Path] = []
            for fmt in spec.export:
                name = {
                    "controlnet": f"{stem}.safetensors",
                    "diffusers": f"{stem}-diffusers",
                    "original": f"{stem}-original.safetensors",
                }[fmt]
                paths += save_controlnet(cn, out / name, fmt, overwrite=True)
            return paths
        # ablation variants without a released format: their trained tensors, for the record
        path = out / f"{spec.objective}.safetensors"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in objective.trainable_state().items()}, str(path)
        )
        return [path]

    return export


def _validator(spec: RunSpec, base: BaseModel, dataset: Any, count: int) -> Any:
    from ..data.outlines import is_outlines_set
    from ..evaluation.evaluate import fill50k_scorer, outlines_scorer
    from ..families import generation_settings

    settings = generation_settings(spec.base) if spec.base else {}  # how the base samples
    sampler = settings.get("sampler", "ddim")
    guidance = spec.validation_guidance
    if guidance is None:
        guidance = float(settings.get("guidance", 9.0))
    scorer = None
    if is_outlines_set(spec.data):  # (a cached set's items keep the set's item indices)
        from ..data import open_dataset

        scorer = outlines_scorer(open_dataset(spec.data, resolution=spec.resolution))
    elif _is_fill50k(dataset):
        scorer = fill50k_scorer
    if spec.objective in _CONTROL_OBJECTIVES and spec.objective != "concat":
        return ControlValidator(
            dataset, count, scorer=scorer, steps=spec.validation_steps, guidance=guidance, sampler=sampler
        )
    return ImageValidator(
        dataset,
        count,
        scorer=scorer if spec.objective == "vae" else None,  # (a base's samples follow no condition)
        steps=spec.validation_steps,
        guidance=guidance,
        sampler=sampler,
    )


def _is_fill50k(dataset: Any) -> bool:
    from ..data.fill50k import parse_prompt

    try:
        parse_prompt(dataset.prompt(len(dataset) - 1))
        return True
    except (ValueError, AttributeError):
        return False


def base_identity(base: BaseModel) -> dict[str, str]:
    """The base a run trains on, as its run.json records it: the family, and a SHA-256 over the
    denoising network's tensors (names, dtypes, shapes, and each one's first and last 4 KiB: a
    resumed run notices another model or other weights without reading all of a large one)."""
    h = hashlib.sha256()
    for key, t in sorted(base.denoiser.state_dict().items()):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        h.update(raw[:4096].numpy().tobytes() + raw[-4096:].numpy().tobytes())
    return {"family": base.family.label, "digest": h.hexdigest()}


def run_training(spec: RunSpec, cfg: TrainConfig) -> TrainResult:
    """Assemble and run a training: the CLI's ``controlnet train``."""
    if spec.export and spec.objective in _EXPORTED:
        bad = [f for f in spec.export if f not in ("controlnet", "diffusers", "original")]
        if bad:
            raise ValueError(f"unknown export format(s) {bad}; expected controlnet, diffusers or original")
    check_out(cfg)  # before the base loads and the data is cached
    base = load_or_build_base(spec, cfg.seed)
    identity = base_identity(base)
    recorded = cfg.extra.get("base") if cfg.resume else None
    if recorded and recorded != identity:
        raise ValueError(
            f"{cfg.out} was trained on the base {recorded['family']} {recorded['digest'][:12]}, and "
            f"{spec.base} now holds {identity['family']} {identity['digest'][:12]}: resume it on its "
            "own base, or start a new run in another --out"
        )
    cfg.extra = {**cfg.extra, "base": identity}
    with torch.random.fork_rng(devices=[]):  # new layers (condition encoder, extra channels) drawn
        torch.manual_seed(cfg.seed)  # from the run's seed: two runs of one seed start alike
        objective = _objective(spec, base)
    # under a launcher (accelerate, torchrun): the process group, and this process's own device
    # for the cache (not the first GPU for all); process 0 builds the cache while the others wait,
    # then they find it built (two builders would replace each other's files under a reader)
    processes = PartialState(cpu=cfg.use_cpu())
    main = processes.is_main_process
    with processes.main_process_first():
        dataset = _dataset(
            spec,
            base,
            objective,
            str(processes.device),
            progress=cfg.progress and main,
            notes=main,
            num_workers=cfg.num_workers,
        )
    cfg.extra = {**cfg.extra, "spec": asdict(spec)}
    validator = _validator(spec, base, dataset, cfg.validation_count) if cfg.validation_count > 0 else None
    return train(cfg, objective, dataset, validator=validator, exporter=_exporter(spec, base, dataset))
