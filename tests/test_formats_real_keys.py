"""Real-size layouts on the meta device: every key of the released SD1.5 / SD2.1 ControlNet v1.0
checkpoints maps to a parameter of our models with the same shape, and none is left over."""

import json
import math
from pathlib import Path

import pytest
import torch

from controlnet import ControlNet, ControlNetConfig, Family
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import unet_config
from controlnet.formats import BaseConfig
from controlnet.formats import diffusers as dif
from controlnet.formats import original as orig
from controlnet.formats.build import build_text_encoder, build_unet, build_vae, make_base
from controlnet.formats.checkpoint import TensorFile
from controlnet.text.tokenizer import clip_tokenizer
from tiny import schedule_buffers

DATA = Path(__file__).parent / "data"
NOTES = json.loads((DATA / "controlldm_keys.notes.json").read_text())


def meta_file(shapes: dict, name: str) -> tuple[TensorFile, set]:
    """A file of meta tensors with ``shapes`` (real schedule buffers); records what is read."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    dtypes = {k: torch.int64 if k.endswith("position_ids") else torch.float32 for k in shapes}
    schedule = schedule_buffers()
    read: set = set()

    def get(key):
        read.add(key)
        if key in schedule:
            return schedule[key]
        return torch.empty(shapes[key], dtype=dtypes[key], device="meta")

    return TensorFile(Path(name), shapes, dtypes, get), read


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("name", "family"), [("sd15", Family.SD1), ("sd21", Family.SD2)])
def test_every_real_key_maps_to_a_parameter_of_the_same_shape(name, family):
    table = json.loads((DATA / f"{name}_controlldm_keys.json").read_text())
    notes = NOTES[name]
    assert len(table) == notes["num_keys"]
    tf, read = meta_file(table, f"{name}.ckpt")
    cn = orig.load_controlnet(tf)  # architecture inferred from shapes alone
    base = make_base(*orig.base_loader(tf))
    # load_into has checked every key and shape of each part; now check nothing was skipped
    text = orig.TEXT_SD1 if family is Family.SD1 else orig.TEXT_SD2
    not_loaded = {k for k in orig.SCHEDULE_KEYS if k != "betas"}  # betas give the schedule
    if family is Family.SD1:
        not_loaded |= {text + "text_model.embeddings.position_ids"}
    else:  # the penultimate-layer convention: the 24th layer and the projection are not built
        not_loaded |= {k for k in table if k.startswith(text + "transformer.resblocks.23.")}
        not_loaded |= {text + "text_projection", text + "logit_scale"}
    assert set(table) - read == not_loaded

    params = notes["num_params_per_prefix (meta build)"]
    assert count(cn) == params["control_model."]
    assert count(base.unet) == params["model.diffusion_model."]
    assert count(base.vae) == params["first_stage_model."]
    assert count(base.text_encoder) == params[text] - sum(
        math.prod(table[k]) for k in not_loaded if k.startswith(text)
    )
    assert base.family is family and cn.num_residuals == 13
    assert (
        cn.config == ControlNetConfig()
        and cn.unet_config["cross_attention_dim"] == {"sd15": 768, "sd21": 1024}[name]
    )
    assert base.schedule["beta_start"] == 0.00085 and base.schedule["beta_end"] == 0.012
    assert base.latent_scale == notes["model_attributes"]["scale_factor"]


@pytest.fixture(scope="module")
def meta_sdxl() -> tuple[UNetBase, ControlNet]:
    cfg = BaseConfig.for_family(Family.SDXL)
    base = UNetBase(
        Family.SDXL,
        build_unet(cfg.unet),
        build_vae(cfg.vae),
        build_text_encoder(cfg.text_encoder),
        clip_tokenizer(Family.SDXL),
        text_encoder_2=build_text_encoder(cfg.text_encoder_2),
        tokenizer_2=clip_tokenizer(Family.SDXL, second=True),
    )
    return base, ControlNet.from_config(unet_config(Family.SDXL))


def test_sdxl_original_layout_at_real_size(meta_sdxl):
    """No released SDXL table here: check well-known names and shapes of sgm's layout, then read
    the whole layout back with the family inferred from shapes."""
    base, cn = meta_sdxl
    shapes = {
        k: tuple(v.shape) for k, v in {**orig.base_tensors(base), **orig.controlnet_tensors(cn)}.items()
    }
    known = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "control_model.label_emb.0.0.weight": (1280, 2816),
        "control_model.input_hint_block.14.weight": (320, 256, 3, 3),
        "control_model.zero_convs.8.0.weight": (1280, 1280, 1, 1),
        "control_model.middle_block_out.0.weight": (1280, 1280, 1, 1),
    }
    assert {k: shapes.get(k) for k in known} == known
    assert sum(k.startswith(orig.UNET) for k in shapes) == len(base.unet.state_dict())
    assert not any(k.startswith("control_model.zero_convs.9") for k in shapes)  # 9 + 1 residuals
    tf, read = meta_file(shapes, "sdxl.safetensors")
    loaded = make_base(*orig.base_loader(tf))
    assert loaded.family is Family.SDXL and loaded.latent_scale == 0.13025
    assert orig.load_controlnet(tf).num_residuals == 10
    assert read == set(shapes)


def test_bare_diffusers_weights_at_real_size(meta_sdxl):
    """SDXL ControlNets are often shared as one diffusers-layout file without config.json."""
    _, cn = meta_sdxl
    tf, _ = meta_file({k: v.shape for k, v in cn.state_dict().items()}, "diffusion_pytorch_model.safetensors")
    loaded = dif.load_controlnet_file(tf)
    assert loaded.num_residuals == 10 and loaded.config == ControlNetConfig()
    assert loaded.unet_config["addition_embed_type"] == "text_time"
