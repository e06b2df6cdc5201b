"""An image through Qwen-Image's video VAE: its causal 3-D convolutions computed as 2-D ones and its
norms fused give the 3-D path's latents and decoded image (to float32 rounding), take no 3-D
kernel, and leave the VAE as it was afterwards; clips of several frames still encode as they did;
the fused norm is diffusers' rounded once in bfloat16."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from controlnet.families.qwenimage import frames
from controlnet.families.qwenimage.frames import frames_as_images


def video_vae() -> AutoencoderKLQwenImage:
    torch.manual_seed(0)  # a time-downsampling level too, as the published VAE has
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True])  # fmt: skip
    with torch.no_grad():  # biases away from zero: a tap that met a padded frame would show
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval()


def count_conv3d(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.nn.functional.conv3d
    monkeypatch.setattr(torch.nn.functional, "conv3d", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@torch.no_grad()
def test_an_image_encodes_and_decodes_as_in_3d_without_3d_kernels(monkeypatch):
    vae = video_vae()
    image = torch.rand(2, 3, 1, 24, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    want = vae.encode(image).latent_dist
    want_image = vae.decode(want.mean).sample
    calls = count_conv3d(monkeypatch)
    norms: list[int] = []
    real_norm = frames.channel_rms_norm
    monkeypatch.setattr(frames, "channel_rms_norm", lambda *a: norms.append(1) or real_norm(*a))
    with frames_as_images(vae):
        got = vae.encode(image).latent_dist
        got_image = vae.decode(want.mean).sample
    assert calls == []  # every convolution took the 2-D path
    assert len(norms) >= sum(isinstance(m, frames.QwenImageRMS_norm) for m in vae.modules())
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.std, want.std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_image, want_image, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in vae.modules())  # the layers' own forward again
    vae.encode(image)
    assert calls  # and 3-D kernels outside the context


@torch.no_grad()
def test_clips_of_several_frames_keep_the_3d_path(monkeypatch):
    vae = video_vae()
    clip = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    want = vae.encode(clip).latent_dist.mean
    with frames_as_images(vae):
        got = vae.encode(clip).latent_dist.mean
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_the_fused_norm_is_diffusers_norm_rounded_once(bias):
    torch.manual_seed(3)
    norm = frames.QwenImageRMS_norm(16, images=False, bias=bias)
    with torch.no_grad():
        norm.gamma.add_(torch.randn_like(norm.gamma))
        if bias:
            norm.bias.add_(torch.randn_like(norm.bias))
    x = torch.randn(2, 16, 1, 5, 7) * 3
    with torch.no_grad():
        want, want_mixed = norm(x), norm(x.bfloat16())
        with frames_as_images(norm):
            got, got_mixed = norm(x), norm(x.bfloat16())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # a bfloat16 frame through float32 weights: a float32 result, as diffusers' type promotion
        assert got_mixed.dtype == want_mixed.dtype == torch.float32
        # (diffusers rounds its normalised values to bfloat16 on the way: up to half a step of the
        # weighted values, before the bias)
        torch.testing.assert_close(
            got_mixed, want_mixed, rtol=0, atol=2**-8 * float((want_mixed - norm.bias).abs().max())
        )

        norm.bfloat16()  # all in bfloat16 (as a bf16 pipeline's VAE): the exact value of its input...
        xb = x.bfloat16()
        exact = frames.QwenImageRMS_norm.forward(norm.float(), xb.float())
        norm.bfloat16()
        with frames_as_images(norm):
            got_bf16 = norm(xb)
        diffusers_bf16 = norm(xb)
    # ...rounded once: within half a bfloat16 step (2**-8 relative); diffusers rounds after its
    # normalisation, scale, weight and bias, further away
    assert got_bf16.dtype == torch.bfloat16
    err = (got_bf16.float() - exact).abs()
    assert (err <= 2**-8 * exact.abs() + 1e-7).all()
    assert err.sum() < (diffusers_bf16.float() - exact).abs().sum()
