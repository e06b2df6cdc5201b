"""Precomputed VAE latents and prompt embeddings, for epochs that skip the frozen encoders.

The ControlNet never changes the VAE or the text encoders, so their outputs for a data set can be
computed once. :func:`build_cache` stores, per item, the VAE posterior's mean and std (unscaled;
the trainer still samples a fresh latent each epoch with :func:`sample_latents`), the condition
(as uint8: exactly the dataset's values), and an index into a table of prompt embeddings that holds
each distinct prompt once; plus the empty prompt's embeddings, for prompt dropout.

On disk (safetensors, written into a temporary folder renamed into place when complete)::

    cache.json                what it was built from (data set fingerprint, base model digest), shapes
    embeds.safetensors        context (U, L, D) [+ text_embeds (U, P), time_ids (U, 6) for SDXL;
                              pooled (U, P) for a transformer],
                              empty_context (1, L, D) [+ the same empty_ ones]
    items-00000.safetensors   latent_mean, latent_std (n, C, H/8, W/8), cond (n, 3, H, W) uint8,
                              embed (n,) int64 row in the embeddings table

:class:`CachedDataset` reads it back and, given the data set or the base model, refuses a cache
built from other ones.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..families.protocol import BaseModel, PromptEmbeddings
from ..imageio import atomic_write_bytes
from .datasets import ControlDataset

__all__ = [
    "CACHE_FORMAT",
    "CacheMismatchError",
    "CachedDataset",
    "base_digest",
    "build_cache",
    "sample_latents",
]

CACHE_FORMAT = "controlnet-cache/1"
_INDEX = "cache.json"
_EMBEDS = "embeds.safetensors"
_ADDED = ("text_embeds", "time_ids", "pooled")  # SDXL's added conditions; a transformer's pooled text


class CacheMismatchError(ValueError):
    """A cache was built from another data set or base model than the one given."""


def base_digest(base: BaseModel) -> str:
    """SHA-256 of what cached tensors depend on: the family, the VAE's scaling factor, and every
    tensor (name, dtype, shape, bytes) of the VAE and text encoder(s). The denoising network (a
    UNet, a transformer) is left out: a cache made before a base's training serves its ControlNet."""
    h = hashlib.sha256()
    h.update(f"{base.family.value} {base.latent_scale!r}".encode())
    for tok in (base.tokenizer, base.tokenizer_2):
        if tok is not None:
            h.update(f"{type(tok).__name__} {len(tok)} {tok.model_max_length}".encode())
    for name, module in base.modules().items():
        if module is base.denoiser:
            continue
        for key, t in sorted(module.state_dict().items()):
            h.update(f"{name}.{key} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scale: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A scaled latent sample ``(mean + std * noise) * scale`` from cached posteriors (B, C, h, w):
    with the same generator, exactly what ``BaseModel.encode_images`` returns for the images."""
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scale


def _read_index(out: Path) -> dict[str, Any]:
    try:
        index = json.loads((out / _INDEX).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{out}: not a cache folder (no {_INDEX})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{out / _INDEX}: malformed ({e.msg})") from None
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{out / _INDEX}: format {index.get('format')!r}, expected {CACHE_FORMAT!r}")
    return index


def _check_source(index: dict[str, Any], out: Path, fingerprint: str | None, digest: str | None) -> None:
    if fingerprint is not None and index["dataset"]["fingerprint"] != fingerprint:
        raise CacheMismatchError(
            f"{out} was built from another data set (or with other options): cache "
            f"{index['dataset']['fingerprint'][:12]}, data set {fingerprint[:12]}; rebuild the cache"
        )
    if digest is not None and index["base"]["digest"] != digest:
        raise CacheMismatchError(
            f"{out} was built with another base model (VAE / text encoders): cache "
            f"{index['base']['digest'][:12]}, model {digest[:12]}; rebuild the cache"
        )


def build_cache(
    dataset: ControlDataset,
    base: BaseModel,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    shard_size: int = 1024,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every item of ``dataset`` with ``base`` into ``out_dir``; return ``out_dir``.

    ``device`` / ``dtype`` move the base model there first (in place, as ``BaseModel.to`` does;
    the VAE stays float32 under float16); tensors are stored in the dtype they come out in. An
    existing cache of the same data set and base model is kept as is; one built from others is an
    error unless ``overwrite``.
    """
    out = Path(out_dir)
    if device is not None or dtype is not None:
        base.to(device, dtype)
    fingerprint, digest = dataset.fingerprint(), base_digest(base)
    if out.exists() and any(out.iterdir()):
        try:
            _check_source(_read_index(out), out, fingerprint, digest)
            return out  # up to date
        except (ValueError, FileNotFoundError):
            if not overwrite:
                raise
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        index = _encode_all(dataset, base, tmp, batch_size, shard_size, num_workers, progress)
        index["dataset"] = {
            "fingerprint": fingerprint,
            "root": str(dataset.root),
            "layout": dataset.layout.value,
        }
        index["base"] = {"digest": digest, "family": base.family.value}
        atomic_write_bytes(tmp / _INDEX, (json.dumps(index, indent=1) + "\n").encode())
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _Shards:
    """Accumulates per-item tensors and writes a shard every ``size`` items."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, size
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.count, self.files = 0, []

    def add(self, **tensors: torch.Tensor) -> None:
        for k, v in tensors.items():
            self.parts.setdefault(k, []).append(v)
        self.count += len(next(iter(tensors.values())))
        while self.count >= self.size:
            self.flush(self.size)

    def flush(self, n: int | None = None) -> None:
        if not self.count:
            return
        joined = {k: torch.cat(v) for k, v in self.parts.items()}
        n = self.count if n is None else n
        name = f"items-{len(self.files):05d}.safetensors"
        save_file({k: v[:n].contiguous() for k, v in joined.items()}, str(self.folder / name))
        self.files.append({"file": name, "count": n})
        self.parts = {k: [v[n:]] for k, v in joined.items()} if self.count > n else {}
        self.count -= n


@torch.no_grad()
def _encode_all(
    dataset: ControlDataset,
    base: BaseModel,
    folder: Path,
    batch_size: int,
    shard_size: int,
    num_workers: int,
    progress: bool,
) -> dict[str, Any]:
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=dataset.collate
    )
    shards = _Shards(folder, shard_size)
    table: dict[tuple[str, int, int], int] = {}  # (prompt, height, width) -> row
    embeds: list[PromptEmbeddings] = []
    prompts: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(dataset), desc="caching latents and embeddings", unit="item")
    for batch in loader:
        target = batch["target"].to(base.device, base.vae.dtype)
        h, w = target.shape[-2:]
        dist = base.posterior(target, per_image=False)
        new = [p for p in dict.fromkeys(batch["prompt"]) if (p, h, w) not in table]
        if new:
            for p in new:
                table[(p, h, w)] = len(table)
            embeds.append(_to_cpu(base.encode_prompt(new, size=(h, w))))
        shards.add(
            latent_mean=dist.mean.cpu(),
            latent_std=dist.std.cpu(),
            cond=(batch["cond"] * 255).round().to(torch.uint8),
            embed=torch.tensor([table[(p, h, w)] for p in batch["prompt"]], dtype=torch.long),
        )
        prompts.extend(batch["prompt"])
        if bar is not None:
            bar.update(len(batch["prompt"]))
    if bar is not None:
        bar.close()
    shards.flush()

    first_size = tuple(int(s) for s in dataset[0]["target"].shape[-2:]) if len(dataset) else None
    empty = _to_cpu(base.encode_prompt([""], size=first_size))
    everything = PromptEmbeddings.cat(embeds)
    tensors = {"context": everything.context, "empty_context": empty.context}
    for src, prefix in ((everything, ""), (empty, "empty_")):
        for k, v in (src.added or {}).items():
            tensors[prefix + k] = v
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / _EMBEDS))
    return {
        "format": CACHE_FORMAT,
        "version": __version__,
        "count": len(prompts),
        "shard_size": shard_size,
        "shards": shards.files,
        "latent_scale": base.latent_scale,
        "prompts": prompts,
        "distinct_prompts": len(table),
    }


def _to_cpu(e: PromptEmbeddings) -> PromptEmbeddings:
    added = None if e.added is None else {k: v.cpu() for k, v in e.added.items()}
    return PromptEmbeddings(e.context.cpu(), added)


class CachedDataset(Dataset):
    """A cache built by :func:`build_cache`, as a Dataset of
    ``{"latent_mean": (C, h, w), "latent_std": (C, h, w), "cond": (3, H, W) uint8 (the trainer
    divides by 255 on the device: a quarter of the bytes through the data loader),
    "context": (77, D), ["added": {"text_embeds": (P,), "time_ids": (6,)}], "index": int, "prompt": str}``.

    Passing the ``dataset`` or the ``base`` model the trainer uses checks that the cache was built
    from them (:class:`CacheMismatchError` otherwise).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        dataset: ControlDataset | None = None,
        base: BaseModel | None = None,
        with_cond: bool = True,
    ) -> None:
        """``with_cond=False`` leaves the conditions out of the items (for a base model's training)."""
        self.root = Path(out_dir)
        self.with_cond = with_cond
        self.meta = _read_index(self.root)
        _check_source(
            self.meta,
            self.root,
            dataset.fingerprint() if dataset is not None else None,
            base_digest(base) if base is not None else None,
        )
        self.latent_scale: float = self.meta["latent_scale"]
        self._prompts: list[str] = self.meta["prompts"]
        self._starts = []
        start = 0
        for shard in self.meta["shards"]:
            self._starts.append(start)
            start += shard["count"]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def prompt(self, i: int) -> str:
        return self._prompts[i]

    def _open(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.root / name), framework="pt")
        return self._handles[name]

    @property
    def empty(self) -> PromptEmbeddings:
        """The empty prompt's embeddings (batch 1), for prompt dropout. SDXL's time ids are those of
        the first item's size."""
        f = self._open(_EMBEDS)
        added = {k: f.get_tensor(f"empty_{k}") for k in _ADDED if f"empty_{k}" in self._embed_keys}
        return PromptEmbeddings(f.get_tensor("empty_context"), added or None)

    @functools.cached_property
    def _embed_keys(self) -> set[str]:
        return set(self._open(_EMBEDS).keys())

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i %= len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[k]
        shard = self._open(self.meta["shards"][k]["file"])
        mean, std, row = (shard.get_slice(n)[j : j + 1][0] for n in ("latent_mean", "latent_std", "embed"))
        embeds = self._open(_EMBEDS)
        r = int(row)
        item: dict[str, Any] = {
            "latent_mean": mean,
            "latent_std": std,
            "context": embeds.get_slice("context")[r : r + 1][0],
            "index": i,
            "prompt": self._prompts[i],
        }
        if self.with_cond:
            item["cond"] = shard.get_slice("cond")[j : j + 1][0]
        added = {k: embeds.get_slice(k)[r : r + 1][0] for k in _ADDED if k in self._embed_keys}
        if added:
            item["added"] = added
        return item

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Stack every tensor along a new batch axis; prompts stay a list, indices become (B,)."""
        keys = [k for k in ("latent_mean", "latent_std", "cond", "context") if k in items[0]]
        batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in keys}
        if "added" in items[0]:
            batch["added"] = {k: torch.stack([it["added"][k] for it in items]) for k in items[0]["added"]}
        batch["prompt"] = [it["prompt"] for it in items]
        batch["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the files
        state = self.__dict__.copy()
        state["_handles"] = {}
        state.pop("_embed_keys", None)
        return state
