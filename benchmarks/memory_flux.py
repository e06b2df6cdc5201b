"""Peak GPU memory and time of a whole Flux.1-dev generation under each memory option, at the
released sizes: `--offload`, FP8 weight storage (`--fp8`) and both.

Flux.1-dev with every part at its published shape and random weights: the transformer (19 double
+ 38 single blocks), CLIP-L, T5-XXL's encoder (4.76 billion parameters), the 16-channel VAE and a
Union ControlNet of 5 double + 10 single blocks; bf16, 1024x1024, 28 steps, guidance 3.5, from the
prompt to uint8 images (the CLIP tokenizer is the package's; T5's is a stand-in giving random ids:
a tokenizer uses no GPU memory). Each row places the models as its option says and runs the
generation twice; the second call's peak is reported, from an emptied cache: the most held by
tensors (``max_memory_allocated``) during the whole call and during the denoising loop alone, and
by the allocator (``max_memory_reserved``). ``--offload`` keeps the text encoders and the VAE in
CPU memory and brings each to the GPU only while it runs; the transformer and ControlNet step off
the card for a visitor that would not fit beside them. One row is a 24 GB card: the same GPU
with all but 24 GB (10^9 bytes) taken before the generation (the peaks leave that out).

    python benchmarks/memory_flux.py --out results/memory-flux.json   # about 5 minutes on an H100
    python benchmarks/memory_flux.py --rows "24 GB card (offload + fp8),fp8" --out ...  # those rows
    python benchmarks/memory_flux.py --smoke                           # tiny shapes, CPU: the script
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
from bench_flux import FULL, TINY, vae
from common import environment, open_zero, table, write_json

from controlnet import Family
from controlnet.families.flux import FluxControlNet, FluxControlNetConfig
from controlnet.families.flux.base import FluxBase
from controlnet.generation.check import check
from controlnet.generation.generate import generate
from controlnet.generation.request import ControlRequest, GenerationRequest
from controlnet.model.fastpath import release_graphs
from controlnet.text.tokenizer import clip_tokenizer

GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
#: T5-v1.1-XXL's encoder, as Flux.1 and SD3 ship it
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
}
T5_TINY = {**T5_XXL, "d_model": 12, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 3}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_TINY = {"hidden_size": 10, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}


class StandInT5Tokenizer:
    """Random token ids of the asked length (T5's tokenizer files are not shipped; a tokenizer's
    output is the same size whatever it reads, and uses no GPU)."""

    def __call__(self, prompts: list[str], *, max_length: int, **_: Any) -> Any:
        g = torch.Generator().manual_seed(len(prompts))
        ids = torch.randint(2, T5_XXL["vocab_size"], (len(prompts), max_length), generator=g)
        return type("Tokens", (), {"input_ids": ids})()


def build(smoke: bool, device: str, dtype: torch.dtype) -> tuple[FluxBase, FluxControlNet]:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    made_in = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random weights made in the dtype they run in (no float32 copy)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**(TINY if smoke else FULL)).to(dtype).eval()
        clip = CLIPTextModel(CLIPTextConfig(**(CLIP_TINY if smoke else CLIP_L), projection_dim=768))
        t5 = T5EncoderModel(T5Config(**(T5_TINY if smoke else T5_XXL)))
    torch.set_default_dtype(made_in)
    base = FluxBase(
        transformer,
        vae(smoke).to(device, dtype),
        clip.to(dtype),
        t5.to(dtype),
        clip_tokenizer(Family.SD1),
        StandInT5Tokenizer(),
        max_sequence_length=512,
    )
    config = FluxControlNetConfig(1, 1, num_mode=3) if smoke else FluxControlNetConfig(5, 10, num_mode=10)
    cn = FluxControlNet.from_transformer(transformer, config, seed=1)
    open_zero(cn, 1)
    return base, cn.to(device, dtype).eval()


def gib_of(*modules: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--rows", help="comma-separated labels of the rows to run, in their order (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: check the script")
    args = p.parse_args()
    cuda = not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    size = 64 if args.smoke else 1024
    t = time.perf_counter()
    base, cn = build(args.smoke, device, dtype)
    print(f"built in {time.perf_counter() - t:.0f} s", flush=True)
    sizes = {
        "transformer": gib_of(base.transformer),
        "controlnet": gib_of(cn),
        "t5": gib_of(base.text_encoder_2),
        "clip": gib_of(base.text_encoder),
        "vae": gib_of(base.vae),
    }
    print("weights, GiB:", {k: round(v, 2) for k, v in sizes.items()}, flush=True)
    tmp = Path(tempfile.mkdtemp())
    cond = np.zeros((size, size, 3), np.uint8)
    cond[size // 4 : 3 * size // 4, size // 8 : 7 * size // 8] = 255
    Image.fromarray(cond).save(tmp / "cond.png")

    loop_peak = {"gib": float("nan")}
    predict = base.predict

    def watched_predict(*a: Any, **kw: Any) -> Any:  # the denoising loop's peak, from its first step
        if cuda and loop_peak.get("reset"):
            torch.cuda.reset_peak_memory_stats()
            loop_peak["reset"] = False
        out = predict(*a, **kw)
        if cuda:
            loop_peak["gib"] = torch.cuda.max_memory_allocated() / GIB
        return out

    base.predict = watched_predict  # type: ignore[method-assign]
    rows: list[dict[str, Any]] = []
    images: dict[str, np.ndarray] = {}
    options = [("default", {}), ("offload", {"offload": True})]
    # a 24 GB card: the same GPU with all but 24 GB taken, the models in CPU memory in bf16 as
    # loaded; the generation converts to FP8 block by block on the card (later rows keep FP8)
    options += [("24 GB card (offload + fp8)", {"offload": True, "fp8": True, "card_gb": 24})] if cuda else []
    options += [("fp8", {"fp8": True}), ("offload + fp8", {"offload": True, "fp8": True})] if cuda else []
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        unknown = sorted(set(wanted) - {label for label, _ in options})
        if unknown:
            known = ", ".join(label for label, _ in options)
            p.error(f"--rows: no row {', '.join(unknown)}; the rows: {known}")
        options = [(label, opts) for label, opts in options if label in wanted]
    for label, opts in options:
        if opts.get("offload") and not cuda:
            continue
        card_gb = opts.pop("card_gb", None)
        request = GenerationRequest(
            prompt=PROMPT,
            controls=[ControlRequest(str(tmp / "cond.png"), control_type=2)],
            steps=2 if args.smoke else 28,
            guidance=3.5,
            sampler="euler",
            seed=0,
            width=size,
            height=size,
            device=device,
            dtype="bfloat16" if cuda else "float32",
            **opts,
        )
        release_graphs(base.transformer)
        if card_gb is not None:  # as loaded: every part in CPU memory
            base.to("cpu")
            cn.to("cpu")
        else:
            if opts.get("fp8"):
                base.use_fp8([cn])  # stays for the later rows (they come last)
            base.to(device, dtype, offload=bool(opts.get("offload")))
        if cuda:
            torch.cuda.synchronize()
        gc.collect()
        resident = torch.cuda.memory_allocated() / GIB if cuda else float("nan")
        ballast = None
        if card_gb is not None:
            total = torch.cuda.mem_get_info()[1]
            ballast = torch.empty(total - int(card_gb * 1e9), dtype=torch.uint8, device=device)
        taken = 0.0 if ballast is None else ballast.numel() / GIB
        seconds = []
        for _ in range(2):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            loop_peak["reset"] = True
            t = time.perf_counter()
            out = generate(check(request), base, [cn], progress=False)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
        images[label] = np.stack(out.images)
        row = {
            "path": label,
            "s/image": round(seconds[1], 2),
            "first call s": round(seconds[0], 1),
            "GPU GiB held between calls": round(resident, 2),
            "peak GiB, whole call": (
                round(torch.cuda.max_memory_allocated() / GIB - taken, 2) if cuda else None
            ),
            "peak GiB, denoising": round(loop_peak["gib"] - taken, 2) if cuda else None,
            "reserved GiB": round(torch.cuda.max_memory_reserved() / GIB - taken, 2) if cuda else None,
        }
        del ballast
        rows.append(row)
        print(row, flush=True)
    release_graphs(base.transformer)
    # offloading moves weights, not arithmetic: each offloaded row against its row without it
    pairs = [("offload", "default"), ("fp8", "default"), ("offload + fp8", "fp8")]
    pairs += [("24 GB card (offload + fp8)", "fp8")]
    agreement = {}
    for label, ref in pairs:
        if label in images and ref in images:
            d = np.abs(images[label].astype(np.int16) - images[ref].astype(np.int16))
            agreement[f"{label} vs {ref}"] = {
                "max |diff| of 255": int(d.max()),
                "mean |diff|": float(d.mean()),
            }
    columns = list(rows[0])
    print(table(rows, columns))
    print("agreement of the images:", agreement)
    write_json(
        args.out,
        {"environment": environment(), "weights_gib": sizes, "rows": rows, "agreement": agreement},
    )


if __name__ == "__main__":
    main()
