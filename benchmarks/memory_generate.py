"""Peak GPU memory of a generation under each memory option: ours against diffusers' pipeline.

SDXL architecture at full size (random weights: the UNet, both text encoders, the VAE, and a
ControlNet copied from the UNet, loaded into diffusers' ControlNetModel for the peer), bf16,
8 DDIM steps with guidance, one ControlNet, at 1024x1024 (SDXL's own size, one VAE tile) and
2048x2048 (what a 2x hires fix makes: four tiles). Each row places the models as its option says
and runs one whole generation (prompt to uint8 images) twice; the second call's peak is the most
memory held by tensors (``max_memory_allocated``) and by the allocator (``max_memory_reserved``,
which also holds the memory that kept CUDA graphs replay into), from an emptied cache.

    python benchmarks/memory_generate.py --out results/memory.json      # about 4 minutes on an H100

Ours: default; ``offload`` (text encoders and VAE in CPU memory, on the GPU only while they
run); ``vae_tiling``; both; batch 4 too at the first size (our VAE decodes one image at a time).
The peer, in the same process: its default, ``vae.enable_tiling()``,
``enable_model_cpu_offload()`` and both. Also the VAE decode of four latents alone: the whole
batch at once (what we did before, and what diffusers does) against one at a time. Checks that
offloading leaves the images bit-identical.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import diffusers_controlnet, environment, open_zero, table, write_json

from controlnet import Family
from controlnet.families.sd.base import UNetBase
from controlnet.families.sd.configs import tiny_unet_config, unet_config, vae_config
from controlnet.families.sd.controlnet import ControlNet, ControlNetConfig
from controlnet.formats.build import TEXT_FIELDS, BaseConfig
from controlnet.generation.check import check
from controlnet.generation.generate import generate
from controlnet.generation.request import ControlRequest, GenerationRequest
from controlnet.model.fastpath import release_graphs
from controlnet.text.tokenizer import clip_tokenizer

STEPS, GUIDANCE, PROMPT = 8, 7.0, "a house by a lake, evening light"
GIB = 2**30


def sdxl(device: str, dtype: torch.dtype, smoke: bool) -> tuple[UNetBase, ControlNet]:
    """An SDXL base model of the released shapes (tiny with ``smoke``) and a ControlNet copied from
    its UNet, random weights, on ``device`` in ``dtype``."""
    torch.manual_seed(0)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = BaseConfig.for_family(Family.SDXL)
    unet_cfg = tiny_unet_config(Family.SDXL, cross_attention_dim=32) if smoke else unet_config(Family.SDXL)
    vae_cfg = vae_config(Family.SDXL)
    te_cfgs = [config.text_encoder, config.text_encoder_2]
    if smoke:  # two 16-wide encoders: a 32-wide context, a 16-wide pooled embedding
        vae_cfg.update(
            block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64
        )
        small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
        te_cfgs = [{**c, **small, "projection_dim": 16} for c in te_cfgs]
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfgs[0].items() if k in TEXT_FIELDS}))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**{k: v for k, v in te_cfgs[1].items() if k in TEXT_FIELDS})
        )
    base = UNetBase(
        Family.SDXL,
        unet,
        vae,
        te,
        clip_tokenizer(Family.SDXL),
        text_encoder_2=te2,
        tokenizer_2=clip_tokenizer(Family.SDXL, second=True),
    ).to(device, dtype)
    cn = ControlNet.from_unet(unet, ControlNetConfig(hint_block_channels=(4, 8, 8, 16)) if smoke else None)
    open_zero(cn, 1)
    return base, cn.to(device, dtype).eval()


def measure(run: Any, cuda: bool) -> dict[str, Any]:
    """``run()`` twice: the first call's seconds (graph captures, tiles' first shapes), then the
    second's seconds and its peak memory in GiB, from an emptied cache: the most held by tensors
    (allocated) and by the allocator (reserved: also the memory kept for replaying CUDA graphs)."""
    t = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    nan = float("nan")
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else nan,
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else nan,
        "seconds": seconds,
        "first_call_s": first,
        "out": out,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument(
        "--sizes", default="1024,2048", help="image sides, comma-separated (the first: batch-4 rows too)"
    )
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script")
    args = p.parse_args()
    cuda = not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sizes = [64, 128] if args.smoke else [int(x) for x in args.sizes.split(",")]
    base, cn = sdxl(device, dtype, args.smoke)
    tmp = Path(tempfile.mkdtemp())
    rows: list[dict[str, Any]] = []
    images: dict[tuple[str, int], np.ndarray] = {}

    def record(path: str, size: int, batch: int, m: dict[str, Any]) -> None:
        row = {"path": path, "size": size, "batch": batch}
        row.update({k: v for k, v in m.items() if k != "out"})
        rows.append(row)
        print(row, flush=True)

    def condition(size: int) -> Path:
        cond = np.zeros((size, size, 3), np.uint8)
        cond[size // 4 : 3 * size // 4, size // 8 : 7 * size // 8] = 255
        Image.fromarray(cond).save(tmp / f"cond{size}.png")
        return tmp / f"cond{size}.png"

    options = [
        ("default", {}),
        ("offload", {"offload": True}),
        ("vae tiling", {"vae_tiling": True}),
        ("offload + vae tiling", {"offload": True, "vae_tiling": True}),
    ]
    for size in sizes:
        runs = [(label, 1, opts) for label, opts in options]
        if size == sizes[0]:
            runs += [("default", 4, {}), ("offload + vae tiling", 4, {"offload": True, "vae_tiling": True})]
        for label, batch, opts in runs:
            if opts.get("offload") and not cuda:
                continue
            request = GenerationRequest(
                prompt=PROMPT,
                controls=[ControlRequest(str(condition(size)))],
                steps=STEPS,
                guidance=GUIDANCE,
                seed=0,
                num_samples=batch,
                width=size,
                height=size,
                device=device,
                dtype="bfloat16" if cuda else "float32",
                **opts,
            )
            release_graphs(base.unet)  # each row captures its own step graphs, in its own memory
            base.to(device, dtype, offload=bool(opts.get("offload")))
            m = measure(lambda request=request: generate(check(request), base, [cn], progress=False), cuda)
            if batch == 1:
                images[label, size] = np.stack(m["out"].images)
            record(f"ours, {label}", size, batch, m)
        release_graphs(base.unet)
        base.to(device, dtype)

    # the VAE decode alone: four latents at once (the whole batch, as before) or one at a time
    size = sizes[0]
    z = torch.randn(4, 4, size // 8, size // 8, device=device, dtype=dtype)
    with torch.no_grad():
        record(
            "VAE decode alone, the whole batch at once",
            size,
            4,
            measure(lambda: base.vae.decode(z).sample, cuda),
        )
        record(
            "VAE decode alone, one image at a time (ours)",
            size,
            4,
            measure(lambda: base.decode_latents(z), cuda),
        )

    agreement = {}
    for size in sizes:
        if cuda:
            diff = np.abs(images["offload", size].astype(int) - images["default", size]).max()
            agreement[f"offload_vs_default_max_abs_diff_{size}"] = int(diff)
        tiled_diff = np.abs(images["vae tiling", size].astype(int) - images["default", size])
        agreement[f"vae_tiling_vs_default_mean_abs_diff_{size}"] = float(tiled_diff.mean())

    if args.peer:
        from diffusers import DDIMScheduler, StableDiffusionXLControlNetPipeline

        theirs = diffusers_controlnet(base.unet, cn)
        del cn
        pipe = StableDiffusionXLControlNetPipeline(
            vae=base.vae,
            text_encoder=base.text_encoder,
            text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2,
            unet=base.unet,
            controlnet=theirs,
            scheduler=DDIMScheduler(
                **base.schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1
            ),
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def call(size: int, batch: int):
            return pipe(
                prompt=PROMPT,
                image=Image.open(condition(size)),
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                num_images_per_prompt=batch,
                height=size,
                width=size,
                output_type="np",
            ).images

        peer_runs = [("default", False, False), ("vae tiling", False, True)]
        if cuda:  # (accelerate's hooks move the parts to the GPU and back)
            peer_runs += [("model CPU offload", True, False), ("model CPU offload + vae tiling", True, True)]
        for label, offload, tiling in peer_runs:
            if offload:
                pipe.enable_model_cpu_offload()
            (pipe.vae.enable_tiling if tiling else pipe.vae.disable_tiling)()
            for size in sizes:
                for batch in (1, 4) if size == sizes[0] and label in ("default", peer_runs[-1][0]) else (1,):
                    m = measure(lambda size=size, batch=batch: call(size, batch), cuda)
                    record(f"diffusers, {label}", size, batch, m)

    print(table(rows, ["path", "size", "batch", "peak_gib", "reserved_gib", "seconds", "first_call_s"]))
    for k, v in agreement.items():
        print(f"{k}: {v}")
    write_json(
        args.out,
        {
            "env": environment(),
            "command": " ".join(sys.argv),
            "steps": STEPS,
            "dtype": str(dtype),
            **agreement,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
