"""Shared tiny models: few channels, the real block structure of each family."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from controlnet import ControlNet, ControlNetConfig, Family
from controlnet.families.sd.configs import tiny_unet_config

LATENT = 8  # latent side; condition images are 8x larger
CROSS = 16
TINY_HINT = ControlNetConfig(hint_block_channels=(4, 8, 8, 16))


def make_unet(family: Family, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(family, cross_attention_dim=CROSS)).eval()


def make_controlnet(
    unet: UNet2DConditionModel, *, open_zero: bool = False, seed: int = 1, **cfg
) -> ControlNet:
    """A ControlNet copied from ``unet``; with ``open_zero`` its zero convs get random weights, as
    after training, so its residuals are not all zero."""
    config = ControlNetConfig(**{**TINY_HINT.to_dict(), **cfg})
    cn = ControlNet.from_unet(unet, config)
    if open_zero:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for z in cn.zero_convs():
                for p in z.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cn


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 2) -> dict:
    """Random latents, timesteps, context (and SDXL added conditions) for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, 4, LATENT, LATENT, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, CROSS, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.rand(batch, 6, generator=g) * 64,
        }
    return inputs


def cond_image(batch: int = 2, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, LATENT * 8, LATENT * 8, generator=g)


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    ).eval()


def make_text_encoder(hidden: int = CROSS, *, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def make_base(family: Family = Family.SD1, seed: int = 0):
    """A complete tiny base model of ``family`` (random weights)."""
    from controlnet.families.sd.base import UNetBase
    from controlnet.text.tokenizer import clip_tokenizer

    if family is Family.SDXL:
        # context = both encoders' hidden states concatenated; pooled = the second's projection
        unet = UNet2DConditionModel(**tiny_unet_config(family, cross_attention_dim=2 * CROSS)).eval()
        return UNetBase(
            family,
            unet,
            make_vae(seed),
            make_text_encoder(seed=seed),
            clip_tokenizer(family),
            text_encoder_2=make_text_encoder(projection=True, seed=seed + 1),
            tokenizer_2=clip_tokenizer(family, second=True),
        )
    return UNetBase(
        family, make_unet(family, seed), make_vae(seed), make_text_encoder(seed=seed), clip_tokenizer(family)
    )


# ---------------------------------------------------------------------------- checkpoint files
def schedule_buffers(steps: int = 1000) -> dict:
    """The schedule buffers an ldm checkpoint stores beside the weights (scaled-linear betas)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    out = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": betas * (1 - prev) / (1 - alphas_cumprod),
        "posterior_log_variance_clipped": (betas * (1 - prev) / (1 - alphas_cumprod)).clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        "logvar": torch.zeros(steps),
    }
    return {k: v.float() for k, v in out.items()}


def released_file(path, tensors: dict, kind: str = "pth"):
    """Write original-layout ``tensors`` the way released files come, without our metadata:
    'pth' a plain pickled dict (the ControlNet releases), 'ckpt' a Lightning-style pickle with
    the weights under 'state_dict', 'safetensors' a bare safetensors file."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    if kind == "safetensors":
        save_file(tensors, str(path))
    elif kind == "ckpt":
        torch.save({"state_dict": tensors, "global_step": 1, "epoch": 0}, path)
    else:
        torch.save(tensors, path)
    return path


#: UNet layers a test LoRA changes: a projection convolution (SD1) or linear layer, and a
#: cross-attention projection
LORA_LAYERS = ("mid_block.attentions.0.proj_out", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")


def lowrank(
    out: int, inp: int, rank: int = 2, k: int = 0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) factors of a rank-``rank`` update of an (out, inp) weight; ``k``: a k x k conv's."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, inp, k, k, generator=g) if k else torch.randn(rank, inp, generator=g)
    up = torch.randn(out, rank, 1, 1, generator=g) if k else torch.randn(out, rank, generator=g)
    return down, up


def lowrank_like(weight: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lowrank` factors in the layout a LoRA file gives ``weight``'s layer (a linear or a
    k x k convolution)."""
    return lowrank(weight.shape[0], weight.shape[1], k=weight.shape[-1] if weight.ndim == 4 else 0, seed=seed)


def kohya(tensors: dict, name: str, down, up, alpha: float | None = None) -> None:
    """Add a layer's factors (and alpha) to ``tensors`` under kohya's key names."""
    tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(alpha)


def lora_file(path, unet: UNet2DConditionModel, seed: int = 0, layers=LORA_LAYERS):
    """A kohya-layout LoRA file (rank 2, no alpha) changing ``unet``'s ``layers``."""
    from safetensors.torch import save_file

    tensors: dict = {}
    for j, layer in enumerate(layers):
        name = "lora_unet_" + layer.replace(".", "_")
        kohya(tensors, name, *lowrank_like(unet.get_submodule(layer).weight, seed + j))
    save_file(tensors, str(path))
    return path


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same keys, and every tensor bitwise equal with the same dtype."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(sa.keys() ^ sb.keys())[:5]
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert torch.equal(sa[k], sb[k]), k


def control_lora_tensors(
    unet: UNet2DConditionModel, seed: int = 0, whole=(), left_out=(), factored_biases: bool = True
) -> dict:
    """A Control-LoRA's tensors for ``unet``, in the layout Stability AI's files have: a trained
    ControlNet (random hint encoder and zero convs, every other tensor of the copy moved a little),
    each convolution and linear weight of the copy as rank-2 ``.down`` / ``.up`` factors of its
    change, every other tensor whole. ``whole``: weights given whole instead; ``left_out``: tensors
    left out (the base UNet's own are used); ``factored_biases=False`` gives the layers given as
    factors the base's biases, unchanged."""
    from controlnet.formats.control_lora import MARKER
    from controlnet.formats.original import CONTROL, controlnet_tensors

    cn = make_controlnet(unet, open_zero=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = {MARKER: torch.tensor([])}
    new_parts = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    copied = {k.removeprefix(CONTROL): t for k, t in controlnet_tensors(cn).items()}
    for key, t in copied.items():
        key = key.removeprefix(CONTROL)
        if key in left_out:
            continue
        layer = key.removesuffix(".weight")
        if (
            key.endswith(".weight")
            and t.ndim in (2, 4)
            and key not in whole
            and not key.startswith(new_parts)
        ):
            down, up = lowrank_like(t, seed=int(torch.randint(0, 2**30, (1,), generator=g)))
            out[layer + ".down"], out[layer + ".up"] = 0.1 * down, 0.1 * up
        else:
            out[key] = t + 0.1 * torch.randn(t.shape, generator=g)
    if not factored_biases:
        for key in [k.removesuffix(".down") + ".bias" for k in out if k.endswith(".down")]:
            if key in out:
                out[key] = copied[key]
    return out


def control_lora_file(path, unet: UNet2DConditionModel, seed: int = 0, **kw):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in control_lora_tensors(unet, seed, **kw).items()}, str(path))
    return path
