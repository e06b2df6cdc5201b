"""Alimama's Flux inpainting ControlNet, against its published reference: the condition is what
its pipeline builds (the image with the masked pixels at -1, through the VAE with Flux's shift and
scale, beside 1 - the mask at the latents' size by nearest neighbour, packed in 2x2 patches), and
the ControlNet is diffusers' FluxControlNetModel with an embedder that reads those extra channels,
as its published model file has it. Written from the published pipeline's steps, not its code."""

from __future__ import annotations

import inspect

import torch
from diffusers import FluxControlNetModel

from controlnet.families.flux import FluxControlNetConfig
from controlnet.families.flux.patches import image_ids, pack, text_ids
from tiny_flux import controlnet, tiny_flux_base


def reference_condition(base, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Alimama's prepare_image_with_mask: image in [-1, 1], mask 1 where to regenerate."""
    masked = image.clone()
    masked[(mask > 0.5).repeat(1, 3, 1, 1)] = -1
    latents = base.vae.encode(masked).latent_dist.mode()
    latents = (latents - base.vae.config.shift_factor) * base.vae.config.scaling_factor
    small = torch.nn.functional.interpolate(mask, size=latents.shape[-2:])
    return pack(torch.cat([latents, 1 - small], dim=1))


def reference_model(cn) -> FluxControlNetModel:
    t = dict(cn.transformer_config)
    accepted = inspect.signature(FluxControlNetModel.__init__).parameters
    model = FluxControlNetModel(
        **{k: v for k, v in t.items() if k in accepted},
        num_layers=cn.config.num_layers,
        num_single_layers=cn.config.num_single_layers,
    ).eval()
    inner = model.controlnet_x_embedder.out_features
    model.controlnet_x_embedder = torch.nn.Linear(t["in_channels"] + 4, inner)  # the mask's 4 channels
    model.load_state_dict(cn.state_dict())  # strict: the published keys, as they are
    return model


def test_the_inpainting_controlnet_equals_the_published_reference():
    base = tiny_flux_base()
    cn = controlnet(base, FluxControlNetConfig(2, 1, extra_condition_channels=4), seed=5)
    g = torch.Generator().manual_seed(2)
    photo = (torch.rand(1, 3, 64, 64, generator=g) * 255).round() / 255
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:44, 20:52] = 1
    # ours: the inpaint map's convention, masked pixels -1, through the family's control hint
    condition = torch.where(mask > 0.5, torch.full_like(photo, -1.0), photo)
    with torch.no_grad():
        ours_hint = pack(base.control_hint(cn, condition))
        want_hint = reference_condition(base, photo * 2 - 1, mask)
        torch.testing.assert_close(ours_hint, want_hint, rtol=1e-5, atol=1e-5)

        h, w = base.latent_size((64, 64))
        x = torch.randn(1, (h // 2) * (w // 2), 16, generator=g)
        context = torch.randn(1, 6, base.transformer.config.joint_attention_dim, generator=g)
        pooled = torch.randn(1, base.transformer.config.pooled_projection_dim, generator=g)
        kw = {"encoder_hidden_states": context, "pooled_projections": pooled, "timestep": torch.tensor([0.7])}
        kw.update(img_ids=image_ids(h, w, x.device, x.dtype), txt_ids=text_ids(6, x.device, x.dtype))
        kw["guidance"] = torch.tensor([3.5])
        ours = cn(x, ours_hint, **kw)
        theirs = reference_model(cn)(hidden_states=x, controlnet_cond=want_hint, return_dict=False, **kw)
    assert ours.single is not None
    for a, b in zip([*ours.double, *ours.single], [*theirs[0], *theirs[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
