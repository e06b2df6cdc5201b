"""Our generation against diffusers' ControlNet pipelines, an implementation written apart from
ours: the same weights, prompts, noise and control images give the same latents. The schedulers
are configured here as SD's released scheduler config has them, not through our sampler table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import Family
from controlnet.choices import Sampler
from controlnet.formats import Format, save_controlnet
from controlnet.generation.check import check
from controlnet.generation.generate import generate
from controlnet.generation.request import ControlRequest, GenerationRequest
from controlnet.generation.sampling import initial_noise, step_generators
from tiny import make_base, make_controlnet

# SD's released scheduler config (what StableDiffusionPipeline.from_pretrained reads)
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def their_scheduler(sampler: str, prediction_type: str, spacing: str = "default"):
    """The scheduler diffusers' documentation maps each A1111 sampler name to; ``spacing`` other
    than "default" sets its ``timestep_spacing``."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        UniPCMultistepScheduler,
    )

    common = {**SD_SCHEDULE, "prediction_type": prediction_type}
    if spacing != "default":
        common["timestep_spacing"] = spacing
    return {
        "ddim": lambda: DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False),
        "unipc": lambda: UniPCMultistepScheduler(**common),
        "dpmpp-2m": lambda: DPMSolverMultistepScheduler(**common),
        "dpmpp-2m-karras": lambda: DPMSolverMultistepScheduler(**common, use_karras_sigmas=True),
        "dpmpp-2m-sde-karras": lambda: DPMSolverMultistepScheduler(
            **common, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
        ),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "euler-a": lambda: EulerAncestralDiscreteScheduler(**common),
        # LCMScheduler.from_config(SD's config), as diffusers' LCM-LoRA guide sets it
        "lcm": lambda: LCMScheduler(**common, clip_sample=False, set_alpha_to_one=False),
    }[sampler]()


def their_pipeline(base, controlnets, sampler: str, spacing: str = "default"):
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    nets = MultiControlNetModel([ControlNetModel.from_pretrained(f).eval() for f in controlnets])
    scheduler = their_scheduler(sampler, base.schedule["prediction_type"], spacing)
    parts = {"vae": base.vae, "text_encoder": base.text_encoder, "tokenizer": base.tokenizer}
    parts.update(unet=base.unet, controlnet=nets, scheduler=scheduler)
    if base.family is Family.SDXL:
        parts.update(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
        return StableDiffusionXLControlNetPipeline(**parts, add_watermarker=False)
    return StableDiffusionControlNetPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def control_images(tmp_path, size: int) -> list[str]:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(2):
        image = np.zeros((size, size, 3), np.uint8)
        image[8 + 8 * i : size - 8, 12 : size - 12 - 4 * i] = 255
        image[rng.random((size, size)) < 0.05] = 128
        paths.append(str(tmp_path / f"cond{i}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths


CASES = [
    *[(f, "ddim", {}) for f in Family],
    *[(Family.SD1, s.value, {}) for s in Sampler if s is not Sampler.DDIM],
    (Family.SD2, "euler-a", {}),
    (Family.SD1, "ddim", {"eta": 0.7}),
    (Family.SD1, "ddim", {"clip_skip": 2}),
    *[(Family.SD1, s, {"timestep_spacing": "trailing"}) for s in ("ddim", "euler", "euler-a")],
    (Family.SD1, "dpmpp-2m", {"timestep_spacing": "leading"}),
    (Family.SD1, "unipc", {"timestep_spacing": "trailing"}),
]


@pytest.mark.parametrize(
    "family, sampler, options",
    CASES,
    ids=[f"{f.value}-{s}" + "".join(f"-{k}-{v}" for k, v in o.items()) for f, s, o in CASES],
)
def test_generation_equals_diffusers_controlnet_pipeline(family, sampler, options, tmp_path, monkeypatch):
    """Two ControlNets of different strengths and step windows, classifier-free guidance with a
    negative prompt, several samples: the final latents agree to float32 rounding. The samplers
    that draw noise at each step draw it from the same generators. Clip skip counts as the A1111
    web UI does: diffusers' ``clip_skip`` is one less."""
    eta, clip_skip = options.get("eta", 0.0), options.get("clip_skip", 1)
    spacing = options.get("timestep_spacing", "default")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = make_base(family)
    if family is Family.SD2:
        base = base.with_schedule(prediction_type="v_prediction")
    cns = [make_controlnet(base.unet, open_zero=True, seed=s) for s in (1, 2)]
    folders = [save_controlnet(cn, tmp_path / f"cn{i}", Format.DIFFUSERS)[0] for i, cn in enumerate(cns)]
    size, steps, seed, n = base.native_size, 4, 7, 2
    images = control_images(tmp_path, size)
    # windows on whole steps of 4, where every convention of "start/end fraction" agrees
    windows = [(0.0, 0.5), (0.25, 1.0)]
    strengths = [0.8, 1.3]
    prompt, negative_text, guidance = "a red square", "blurry", 7.5  # told to both sides alike
    request = GenerationRequest(
        prompt=prompt,
        added_prompt="",
        negative_prompt=negative_text,
        prompt_syntax="plain",
        clip_skip=clip_skip,
        controls=[
            ControlRequest(img, strength=s, start=w[0], end=w[1])
            for img, s, w in zip(images, strengths, windows)
        ],
        sampler=sampler,
        timestep_spacing=spacing,
        eta=eta,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_samples=n,
        resolution=size,
    )
    ours = generate(check(request), base, cns, progress=False).latents

    pipe = their_pipeline(base, folders, sampler, spacing)
    if not hasattr(base.text_encoder, "text_model"):
        # diffusers' clip skip reads text_encoder.text_model, which transformers 5's CLIPTextModel
        # no longer has (its layers sit on the model itself): point it there, unregistered
        object.__setattr__(base.text_encoder, "text_model", base.text_encoder)
    shape = (n, base.unet.config.in_channels, *base.latent_size((size, size)))
    seeds = [seed + i for i in range(n)]
    noise = initial_noise(shape, seeds, torch.device("cpu"), torch.float32)
    negative = {"negative_prompt": negative_text}
    with torch.no_grad():
        if clip_skip > 1:
            # diffusers skips layers for the prompt only (the A1111 web UI and we: for both), so
            # its negative embeddings are its own encoding of the negative text as a prompt
            negative = {
                "negative_prompt_embeds": pipe.encode_prompt(negative_text, "cpu", 1, False, clip_skip=1)[0]
            }
        theirs = pipe(
            prompt=prompt,
            **negative,
            image=[Image.open(p) for p in images],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            latents=noise,
            generator=step_generators(seeds),
            eta=eta,
            clip_skip=clip_skip - 1 or None,
            controlnet_conditioning_scale=strengths,
            control_guidance_start=[w[0] for w in windows],
            control_guidance_end=[w[1] for w in windows],
            output_type="latent",
        ).images
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the controls matter here: without them the result is far from this one
    plain = generate(
        check(GenerationRequest(**{**request.__dict__, "controls": []})), base, [], progress=False
    ).latents
    assert (plain - theirs).abs().max() > 100 * 1e-4
