"""Validation during ControlNet training: a held-out loss, sample grids, a controllability score.

The held-out items (the dataset's last ones, which the trainer never trains on) are denoised with
the same loop generation uses, at fixed seeds and prompts, so successive grids are comparable and
the score's curve shows when the model starts to follow its conditions ("sudden convergence").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..generation.denoiser import ControlUnit
from ..generation.sampling import Sampling, render, to_images
from ..imageio import make_grid, save_png, to_uint8
from ..model.fastpath import release_graphs
from .objectives import ControlNetObjective, StepNoise, as_condition

__all__ = ["ControlValidator", "ImageValidator", "Scorer"]

#: (generated images, their held-out items) -> named scores, higher is better.
Scorer = Callable[[list[np.ndarray], list[dict[str, Any]]], dict[str, float]]


def _warn_if_not_finite(latents: torch.Tensor, step: int) -> None:
    """Name the samples that came out NaN or inf (their images would only be drawn black)."""
    bad = int((~torch.isfinite(latents.flatten(1)).all(dim=1)).sum())
    if bad:
        warnings.warn(
            f"validation at step {step}: {bad} of {len(latents)} samples are not finite (NaN or "
            "inf); their images are black and their scores meaningless",
            RuntimeWarning,
            stacklevel=3,
        )


class ControlValidator:
    """Callable the trainer runs every ``validate_every`` steps on process 0 (on every process when
    the weights are sharded: sampling then needs them all)."""

    def __init__(
        self,
        dataset: Dataset,
        count: int,
        *,
        scorer: Scorer | None = None,
        steps: int = 20,
        guidance: float = 9.0,
        negative_prompt: str = "",
        seed: int = 0,
        sampler: str = "ddim",
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        self.items = [dataset[i] for i in range(max(0, n - count), n)]
        self.scorer = scorer
        self.steps, self.guidance, self.seed, self.sampler = steps, guidance, seed, sampler
        self.negative_prompt = negative_prompt

    def _batch(self, device: torch.device) -> dict[str, Any]:
        batch: dict[str, Any] = {"prompt": [it["prompt"] for it in self.items]}
        for k in ("target", "cond", "latent_mean", "latent_std", "context"):
            if k in self.items[0]:
                batch[k] = torch.stack([it[k] for it in self.items]).to(device)
        if "added" in self.items[0]:  # cached added conditions (SDXL's, a transformer's pooled text)
            keys = self.items[0]["added"]
            batch["added"] = {k: torch.stack([it["added"][k] for it in self.items]).to(device) for k in keys}
        return batch

    @torch.no_grad()
    def __call__(self, objective: Any, step: int, run_dir: Path | None) -> dict[str, float]:
        """The scores; the sample grid goes to ``run_dir`` (None: not written)."""
        if not isinstance(objective, ControlNetObjective) or not self.items:
            return {}
        base, cn = objective.inputs.base, objective.controlnet
        was_training = cn.training
        cn.eval()
        device = base.device
        batch = self._batch(device)
        n = len(self.items)
        # held-out loss at fixed noise and timesteps (prompt dropout off), comparable across steps
        prob, objective.inputs.empty_prompt_prob = objective.inputs.empty_prompt_prob, 0.0
        with torch.autocast(device.type, enabled=base.dtype != torch.float32, dtype=base.dtype):
            losses = [
                objective(batch, StepNoise(self.seed, -1, k, n, slice(0, n), device)).item() for k in range(4)
            ]
        objective.inputs.empty_prompt_prob = prob
        scores: dict[str, float] = {"val_loss": float(np.mean(losses))}

        cond = as_condition(batch["cond"]).to(base.dtype)
        out = render(
            base,
            [ControlUnit(cn, cond, control_type=objective.control_mode)],
            batch["prompt"],
            [self.negative_prompt] * n,
            [self.seed + i for i in range(n)],
            tuple(cond.shape[-2:]),  # type: ignore[arg-type]
            Sampling(self.sampler, steps=self.steps, guidance=self.guidance),
            progress=False,
        )
        release_graphs(base.denoiser)  # the step graphs' memory goes back to training
        _warn_if_not_finite(out.latents, step)
        images = to_images(base, out.latents)
        if "target" in batch:
            targets = [to_uint8(t) for t in batch["target"]]
        else:  # a latent cache holds no pixels: show the decoded posterior mean
            targets = [to_uint8(x) for x in base.decode_latents(_clean_latents(base, batch["latent_mean"]))]
        rows = [[to_uint8(it["cond"], lo=0.0), img, tgt] for it, img, tgt in zip(self.items, images, targets)]
        if run_dir is not None:
            save_png(make_grid(rows), run_dir / "samples" / f"step-{step:08d}.png")
        if self.scorer is not None:
            scores.update({f"score/{k}": v for k, v in self.scorer(images, self.items).items()})
        cn.train(was_training)
        return scores


class ImageValidator:
    """Validation for the two stages of a base model trained from scratch: reconstructions and
    their PSNR (``vae``; with a ``scorer``, the reconstructions scored against their conditions as
    a ControlNet's outputs would be: the most any model on this VAE can score), or samples from the
    held-out prompts alone (``base``; scored for the prompts' colours on fill50k data)."""

    def __init__(
        self,
        dataset: Dataset,
        count: int,
        *,
        scorer: Scorer | None = None,
        steps: int = 20,
        guidance: float = 9.0,
        seed: int = 0,
        sampler: str = "ddim",
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        self.items = [dataset[i] for i in range(max(0, n - count), n)]
        self.steps, self.guidance, self.seed, self.sampler = steps, guidance, seed, sampler
        self.scorer = scorer

    @torch.no_grad()
    def __call__(self, objective: Any, step: int, run_dir: Path | None) -> dict[str, float]:
        from .objectives import BaseObjective, VaeObjective

        if not self.items or not ("target" in self.items[0] or "latent_mean" in self.items[0]):
            return {}
        if "target" in self.items[0]:
            targets = [to_uint8(it["target"]) for it in self.items]
        else:  # a latent cache: show the decoded posterior means
            base = objective.inputs.base
            mean = torch.stack([it["latent_mean"] for it in self.items]).to(base.device)
            targets = [to_uint8(x) for x in base.decode_latents(_clean_latents(base, mean))]
        if isinstance(objective, VaeObjective):
            vae = objective.vae
            was = vae.training
            vae.eval()
            x = torch.stack([it["target"] for it in self.items]).to(next(vae.parameters()).device)
            rec = vae.decode(objective.base.posterior(x, per_image=False).mean).sample.clamp(-1, 1)
            vae.train(was)
            outs = [to_uint8(r) for r in rec]
            mse = float(((rec.float() - x.float()) ** 2).mean())
            scores = {"psnr_db": 10 * float(np.log10(4.0 / max(mse, 1e-12)))}  # signal range [-1, 1]
            if self.scorer is not None:
                scores.update(self.scorer(outs, self.items))
        elif isinstance(objective, BaseObjective):
            base = objective.inputs.base
            mods = [objective.network, objective.text_encoder]
            was = [m.training for m in mods]
            for m in mods:
                m.eval()
            prompts = [it["prompt"] for it in self.items]
            out = render(
                base,
                [],
                prompts,
                [""] * len(prompts),
                [self.seed + i for i in range(len(prompts))],
                targets[0].shape[:2],
                Sampling(self.sampler, steps=self.steps, guidance=self.guidance),
                progress=False,
            )
            release_graphs(base.denoiser)
            _warn_if_not_finite(out.latents, step)
            for m, w in zip(mods, was):
                m.train(w)
            outs = to_images(base, out.latents)
            scores = _prompt_colour_scores(outs, prompts)
        else:
            return {}
        if run_dir is not None:
            grid = make_grid([[t, o] for t, o in zip(targets, outs)])
            save_png(grid, run_dir / "samples" / f"step-{step:08d}.png")
        return {f"score/{k}": v for k, v in scores.items()}


def _prompt_colour_scores(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    """Mean prompt-colour accuracy of prompt-only samples when the prompts are fill50k's."""
    from ..data.colors import rgb
    from ..data.fill50k import parse_prompt
    from ..evaluation.evaluate import prompt_colours

    rows = []
    for img, p in zip(images, prompts):
        try:
            colour, _, background = parse_prompt(p)
        except ValueError:
            return {}
        rows.append(prompt_colours(img, rgb(colour), rgb(background)))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def _clean_latents(base: Any, mean: torch.Tensor) -> torch.Tensor:
    """A cached posterior mean as the model's latents (scaled, and shifted where the family shifts)."""
    zero = torch.zeros_like(mean)
    return base.scaled_sample(mean, zero, zero)
