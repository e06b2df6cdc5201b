"""Flux.1 generation through the generic path (the family protocol's FluxBase): equal to diffusers'
FluxControlNetPipeline on the same tiny weights, noise and conditions - one ControlNet, two with
their own strengths, a Union ControlNet in two modes - and the guidance scale read as an input."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
)

from controlnet.families.flux import FluxControlNet, FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.families.flux.patches import pack
from controlnet.families.flux.schedule import FLUX_SCHEDULE
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import Sampling, initial_noise, render
from tiny_flux import TRANSFORMER, controlnet, tiny_flux_base

SIZE, SEQ = (32, 48), 16  # pixels (H, W); T5 tokens


@pytest.fixture(scope="module")
def world():
    return tiny_flux_base(SEQ)


def peer(cn: FluxControlNet) -> FluxControlNetModel:
    model = FluxControlNetModel(
        **{k: v for k, v in TRANSFORMER.items() if k not in ("num_layers", "num_single_layers")},
        num_layers=cn.config.num_layers,
        num_single_layers=cn.config.num_single_layers,
        num_mode=cn.config.num_mode,
    ).eval()
    model.load_state_dict(cn.state_dict())
    return model


def pipeline(cls, base: FluxBase, controlnet):
    """A diffusers Flux pipeline of class ``cls`` over ``base``'s parts and ``controlnet``."""
    pipe = cls(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        transformer=base.transformer,
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def ours(base, units, seeds, steps=4, guidance=3.5):
    sampling = Sampling("euler", "default", steps, guidance)
    out = render(
        base, units, ["a red disk"] * len(seeds), [""] * len(seeds), seeds, SIZE, sampling, progress=False
    )
    return pack(out.latents)


def theirs(base, cns, conds, scales, modes, seeds, steps=4, guidance=3.5, starts=None, ends=None):
    pipe = pipeline(FluxControlNetPipeline, base, [peer(c) for c in cns] if len(cns) > 1 else peer(cns[0]))
    h, w = base.latent_size(SIZE)
    noise = pack(initial_noise((len(seeds), 4, h, w), seeds, torch.device("cpu"), torch.float32))
    many = len(cns) > 1
    # a tensor reaches the pipeline's VAE as it is (only images are normalised): give it [-1, 1]
    conds = [c * 2 - 1 for c in conds]
    kw = {}
    if starts is not None:
        kw = {
            "control_guidance_start": starts if many else starts[0],
            "control_guidance_end": ends if many else ends[0],
        }
    with torch.no_grad():
        return pipe(
            prompt=["a red disk"] * len(seeds),
            control_image=conds if many else conds[0],
            control_mode=(modes if many else modes[0]) if any(m is not None for m in modes) else None,
            controlnet_conditioning_scale=scales if many else scales[0],
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise,
            max_sequence_length=SEQ,
            output_type="latent",
            **kw,
        ).images


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_one_controlnet_equals_the_pipeline(world):
    cn = controlnet(world, FluxControlNetConfig(2, 1), seed=1)
    unit = ControlUnit(cn, condition(5), strength=0.8)
    close(ours(world, [unit], [7, 8]), theirs(world, [cn], [condition(5)], [0.8], [None], [7, 8]))


def test_two_controlnets_with_their_own_strengths_and_windows(world):
    a = controlnet(world, FluxControlNetConfig(2, 1), seed=1)
    b = controlnet(world, FluxControlNetConfig(2, 1), seed=2)
    units = [ControlUnit(a, condition(5), 0.7, 0.0, 0.5), ControlUnit(b, condition(6), 1.2, 0.25, 1.0)]
    got = ours(world, units, [3])
    want = theirs(
        world,
        [a, b],
        [condition(5), condition(6)],
        [0.7, 1.2],
        [None, None],
        [3],
        starts=[0.0, 0.25],
        ends=[0.5, 1.0],
    )
    close(got, want)


@pytest.mark.parametrize("mode", [0, 2])
def test_a_union_controlnet_in_each_mode(world, mode):
    cn = controlnet(world, FluxControlNetConfig(1, 2, num_mode=3), seed=4)
    unit = ControlUnit(cn, condition(9), 1.0, control_type=mode)
    close(ours(world, [unit], [11]), theirs(world, [cn], [condition(9)], [1.0], [mode], [11]))


def test_guidance_is_an_input_and_no_negative_is_encoded(world, monkeypatch):
    calls = []
    encode = FluxBase.encode_prompt
    monkeypatch.setattr(
        FluxBase, "encode_prompt", lambda self, p, **kw: calls.append(list(p)) or encode(self, p)
    )
    a = ours(world, [], [5], guidance=1.5)
    b = ours(world, [], [5], guidance=4.0)
    assert calls == [["a red disk"], ["a red disk"]]  # the prompt only, never the negative
    assert not torch.equal(a, b)  # the scale reached the network


def test_img2img_equals_the_pipeline(world, monkeypatch):
    """Half the schedule from an image's latents. We take the image's (and the condition's)
    posterior mean where diffusers draws a sample with the seed's generator, which also moves that
    generator; the comparison lets diffusers take the mean too, all else as it is."""
    import diffusers.pipelines.flux.pipeline_flux_controlnet_image_to_image as img2img
    from diffusers import FluxControlNetImg2ImgPipeline

    monkeypatch.setattr(
        img2img, "retrieve_latents", lambda out, generator=None, sample_mode=None: out.latent_dist.mode()
    )
    cn = controlnet(world, FluxControlNetConfig(2, 1), seed=1)
    image = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(21))
    init = world.encode_images(image * 2 - 1)
    sampling = Sampling("euler", "default", 4, 3.5)
    unit = ControlUnit(cn, condition(5), 0.9)
    got = render(
        world,
        [unit],
        ["a red disk"],
        [""],
        [7],
        SIZE,
        sampling,
        init_latents=init,
        denoise_strength=0.5,
        progress=False,
    ).latents
    pipe = pipeline(FluxControlNetImg2ImgPipeline, world, peer(cn))
    with torch.no_grad():
        want = pipe(
            prompt=["a red disk"],
            image=image * 2 - 1,
            control_image=condition(5) * 2 - 1,
            controlnet_conditioning_scale=0.9,
            strength=0.5,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=4,
            guidance_scale=3.5,
            generator=[torch.Generator().manual_seed(7)],
            max_sequence_length=SEQ,
            output_type="latent",
        ).images
    close(pack(got), want)


def test_masked_editing_equals_the_inpaint_pipeline(world, monkeypatch):
    """Regenerate inside a mask (on whole latent cells), keep the source outside, from the
    image's latents at full strength. As for img2img, both sides take the posterior mean."""
    import diffusers.pipelines.flux.pipeline_flux_controlnet_inpainting as inpainting
    from diffusers import FluxControlNetInpaintPipeline

    from controlnet.generation.sampling import mask_to_latent

    monkeypatch.setattr(
        inpainting, "retrieve_latents", lambda out, generator=None, sample_mode=None: out.latent_dist.mode()
    )
    cn = controlnet(world, FluxControlNetConfig(2, 1), seed=1)
    image = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(21))
    pixel_mask = torch.zeros(1, 1, *SIZE)
    pixel_mask[..., 8:24, 12:36] = 1.0  # whole 2x2 latent cells of the tiny VAE
    init = world.encode_images(image * 2 - 1)
    mask = mask_to_latent(pixel_mask, world.latent_size(SIZE))
    sampling = Sampling("euler", "default", 4, 3.5)
    got = render(
        world,
        [ControlUnit(cn, condition(5), 0.9)],
        ["a red disk"],
        [""],
        [7],
        SIZE,
        sampling,
        init_latents=init,
        mask=mask,
        progress=False,
    ).latents
    pipe = pipeline(FluxControlNetInpaintPipeline, world, peer(cn))
    with torch.no_grad():
        want = pipe(
            prompt=["a red disk"],
            image=image * 2 - 1,
            mask_image=pixel_mask,
            control_image=condition(5) * 2 - 1,
            controlnet_conditioning_scale=0.9,
            strength=1.0,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=4,
            guidance_scale=3.5,
            generator=[torch.Generator().manual_seed(7)],
            max_sequence_length=SEQ,
            output_type="latent",
        ).images
    close(pack(got), want)


def test_a_control_region_weights_each_token_by_its_patch(world):
    """A region (1, 1, h, w) at the latents' size scales each residual token by the region's mean
    over the token's 2x2 patch: nothing outside, all of it inside."""
    from controlnet.families.flux.patches import image_ids
    from controlnet.model.control import Control

    cn = controlnet(world, FluxControlNetConfig(2, 1), seed=1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 8, 12, generator=g)
    context = torch.randn(1, SEQ, 12, generator=g)
    added = {"pooled": torch.randn(1, 10, generator=g), "guidance": torch.tensor([3.5])}
    hint = torch.randn(1, 4, 8, 12, generator=g)
    t = torch.tensor(600.0)
    region = torch.zeros(1, 1, 8, 12)
    region[..., :, :6] = 1.0  # the left half: whole patches
    region[..., 0:2, 6:8] = 0.5  # one patch at half strength

    def predict(r):
        with torch.no_grad():
            return world.predict(x, t, context, [Control(cn, hint, [0.8] * 3, False, r)], added=added)

    with torch.no_grad():
        plain = world.predict(x, t, context, [], added=added)
    assert torch.equal(predict(torch.zeros(1, 1, 8, 12)), plain)  # acts nowhere: the base alone
    assert torch.equal(predict(torch.ones(1, 1, 8, 12)), predict(None))  # everywhere: as without one
    # by hand: the residuals times each token's weight, then the transformer
    with torch.no_grad():
        ids = image_ids(8, 12, x.device, x.dtype)
        kw = {
            "encoder_hidden_states": context,
            "pooled_projections": added["pooled"],
            "timestep": t.expand(1) / 1000,
            "img_ids": ids,
            "txt_ids": torch.zeros(SEQ, 3),
            "guidance": added["guidance"],
        }
        res = cn(pack(x), pack(hint), **kw)
        weight = torch.nn.functional.avg_pool2d(region, 2).flatten(2).transpose(1, 2)
        double = [r * 0.8 * weight for r in res.double]
        single = [r * 0.8 * weight for r in res.single]
        want = world.transformer(
            hidden_states=pack(x),
            controlnet_block_samples=double,
            controlnet_single_block_samples=single,
            **kw,
        ).sample
    from controlnet.families.flux.patches import unpack

    torch.testing.assert_close(predict(region), unpack(want, 8, 12), rtol=1e-5, atol=1e-6)


def test_true_guidance_equals_fluxpipelines_true_cfg(world):
    """Classifier-free guidance against the negative prompt, beside the scale the network reads
    (diffusers' true_cfg_scale); a model without a guidance input refuses the field."""
    from diffusers import FluxPipeline

    sampling = Sampling("euler", "default", 3, 3.5, true_guidance=2.5)
    got = render(world, [], ["a red disk"], ["blurry"], [4], SIZE, sampling, progress=False).latents
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULE),
        vae=world.vae,
        text_encoder=world.text_encoder,
        tokenizer=world.tokenizer,
        text_encoder_2=world.text_encoder_2,
        tokenizer_2=world.tokenizer_2,
        transformer=world.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = world.latent_size(SIZE)
    noise = pack(initial_noise((1, 4, h, w), [4], torch.device("cpu"), torch.float32))
    with torch.no_grad():
        want = pipe(
            prompt=["a red disk"],
            negative_prompt=["blurry"],
            true_cfg_scale=2.5,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=3,
            guidance_scale=3.5,
            latents=noise,
            max_sequence_length=SEQ,
            output_type="latent",
        ).images
    close(pack(got), want)
    no_cfg = render(
        world, [], ["a red disk"], ["blurry"], [4], SIZE, Sampling("euler", "default", 3, 3.5), progress=False
    )
    assert not torch.allclose(no_cfg.latents, got)


def test_conditional_half_controls_and_concurrent_controls(world):
    """With true guidance, a "ControlNet is more important" control acts on the conditional half
    only; several controls asked to run concurrently give what they give one after another."""
    from controlnet.model.control import Control

    a = controlnet(world, FluxControlNetConfig(2, 1), seed=1)
    b = controlnet(world, FluxControlNetConfig(1, 2, num_mode=3), seed=2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 12, generator=g)
    context = torch.randn(2, SEQ, 12, generator=g)
    added = {"pooled": torch.randn(2, 10, generator=g), "guidance": torch.tensor([3.5, 3.5])}
    hint = torch.randn(1, 4, 8, 12, generator=g)
    t = torch.tensor(600.0)

    def predict(controls, **kw):
        with torch.no_grad():
            return world.predict(x, t, context, controls, added=added, cfg_batch=True, **kw)

    plain = predict([])
    half = predict([Control(a, hint, [1.0] * 3, True)])
    both = predict([Control(a, hint, [1.0] * 3)])
    torch.testing.assert_close(half[:1], plain[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half[1:], both[1:], rtol=1e-5, atol=1e-6)
    two = [Control(a, hint, [1.0] * 3), Control(b, hint, [0.5] * 3, control_type=1)]
    assert torch.equal(predict(two, concurrent=True), predict(two))
