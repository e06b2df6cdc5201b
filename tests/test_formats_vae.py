"""Standalone VAE files in every layout they come in, read into a base model's VAE."""

from dataclasses import replace

import pytest
import torch

from controlnet import Family
from controlnet.formats import CheckpointError, load_vae
from controlnet.formats.original import VAE, base_tensors
from tiny import assert_same_state, make_base, make_vae, released_file


@pytest.fixture(scope="module")
def base():
    return make_base(Family.SD1)


@pytest.fixture(scope="module")
def other():
    """A fine-tuned VAE: the base's architecture, other weights."""
    return make_vae(seed=5)


def original_tensors(base, vae, *, whole: bool = False) -> dict:
    """``vae`` under the original names: bare (a released VAE file) or inside a whole checkpoint."""
    tensors = base_tensors(replace(base, vae=vae))
    if whole:
        return tensors
    return {k[len(VAE) :]: v for k, v in tensors.items() if k.startswith(VAE)}


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "pth"])
def test_original_layout_files(base, other, tmp_path, kind):
    path = released_file(tmp_path / f"vae.{kind}", original_tensors(base, other), kind)
    got = load_vae(path, like=base.vae)
    assert_same_state(got, other)
    assert not torch.equal(got.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)


def test_a_whole_checkpoints_vae_and_training_leftovers(base, other, tmp_path):
    tensors = {**original_tensors(base, other, whole=True), "loss.logvar": torch.zeros(())}
    assert_same_state(load_vae(released_file(tmp_path / "model.ckpt", tensors, "ckpt"), like=base.vae), other)
    bare = {**original_tensors(base, other), "model_ema.decay": torch.ones(())}
    assert_same_state(load_vae(released_file(tmp_path / "vae.pt", bare, "pth"), like=base.vae), other)


def test_diffusers_layout_file_and_folder(base, other, tmp_path):
    state = {k: v.clone() for k, v in other.state_dict().items()}
    path = released_file(tmp_path / "diffusion_pytorch_model.safetensors", state, "safetensors")
    assert_same_state(load_vae(path, like=base.vae), other)
    other.save_pretrained(tmp_path / "vae")  # diffusers' own writer
    got = load_vae(tmp_path / "vae", like=base.vae, dtype=torch.float16)
    assert got.decoder.conv_out.weight.dtype == torch.float16
    torch.testing.assert_close(
        got.decoder.conv_out.weight.float(), other.decoder.conv_out.weight, atol=1e-3, rtol=0
    )
    assert got.config.scaling_factor == base.vae.config.scaling_factor


def test_what_is_not_a_vae_for_this_model_is_refused(base, other, tmp_path):
    unet_only = {k: v for k, v in base_tensors(base).items() if k.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match="holds no VAE"):
        load_vae(released_file(tmp_path / "unet.safetensors", unet_only, "safetensors"), like=base.vae)
    wider = make_vae(seed=1)
    wider.register_to_config(scaling_factor=0.13025)  # SDXL's latent scale
    wider.save_pretrained(tmp_path / "sdxl_vae")
    with pytest.raises(
        CheckpointError, match=r"scaling_factor 0\.13025, but the base model's latents have 0\.18215"
    ):
        load_vae(tmp_path / "sdxl_vae", like=base.vae)
    tensors = original_tensors(base, other)
    tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"][:, :4]
    with pytest.raises(CheckpointError, match=r"decoder\.conv_out\.weight"):
        load_vae(released_file(tmp_path / "cut.safetensors", tensors, "safetensors"), like=base.vae)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers VAE folder"):
        load_vae(tmp_path / "empty_folder", like=base.vae)
