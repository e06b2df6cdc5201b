"""The latent / embedding cache: it holds exactly what the encoders give, and knows what it was built from."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from controlnet import Family
from controlnet.data import cache as cache_module
from controlnet.data.cache import CachedDataset, CacheMismatchError, base_digest, build_cache, sample_latents
from controlnet.data.datasets import open_dataset
from controlnet.data.fill50k import generate
from controlnet.training.objectives import as_condition
from tiny import make_base


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("c") / "fill", 4, size=32, seed=0, progress=False, workers=1)


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL], ids=lambda f: f.value)
def test_cache_round_trips_the_encoders_outputs(fill, tmp_path, family):
    base, ds = make_base(family), open_dataset(fill)
    out = build_cache(ds, base, tmp_path / "cache", batch_size=2, shard_size=3, progress=False)
    cached = CachedDataset(out, dataset=ds, base=base)
    assert len(cached) == len(ds) == 4 and cached.latent_scale == base.latent_scale
    assert [s["count"] for s in cached.meta["shards"]] == [3, 1]

    batch = DataLoader(cached, batch_size=2, collate_fn=cached.collate)
    for start, b in zip(range(0, 4, 2), batch):
        items = [ds[i] for i in range(start, start + 2)]
        images = torch.stack([it["target"] for it in items])
        dist = base.vae.encode(images).latent_dist  # the same batches as the cache was built with
        torch.testing.assert_close(b["latent_mean"], dist.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(b["latent_std"], dist.std, rtol=0, atol=1e-6)
        # stored and handed out as uint8 (a quarter of the bytes); exact after the division by 255
        assert b["cond"].dtype == torch.uint8
        assert torch.equal(as_condition(b["cond"]), torch.stack([it["cond"] for it in items]))
        prompts = [it["prompt"] for it in items]
        assert b["prompt"] == prompts and b["index"].tolist() == [it["index"] for it in items]
        emb = base.encode_prompt(prompts, size=(32, 32))
        torch.testing.assert_close(b["context"], emb.context, rtol=0, atol=1e-5)
        if family is Family.SDXL:
            assert set(b["added"]) == {"text_embeds", "time_ids"}
            for k, v in emb.added.items():
                torch.testing.assert_close(b["added"][k], v, rtol=0, atol=1e-5)
        else:
            assert "added" not in b
        # the trainer's posterior samples are exactly encode_images' for one generator
        g1, g2 = torch.Generator().manual_seed(start), torch.Generator().manual_seed(start)
        torch.testing.assert_close(
            sample_latents(b["latent_mean"], b["latent_std"], cached.latent_scale, g1),
            base.encode_images(images, g2),
            rtol=0,
            atol=1e-5,
        )
    empty = base.encode_prompt([""], size=(32, 32))
    torch.testing.assert_close(cached.empty.context, empty.context, rtol=0, atol=1e-5)
    assert (cached.empty.added is None) == (family is not Family.SDXL)


def test_worker_processes_build_the_same_cache(fill, tmp_path):
    """Images read by worker processes (train's --num-workers, as its run's own loader) give the
    cache the main process alone gives, item for item: the loader keeps the order."""
    base, ds = make_base(), open_dataset(fill)
    alone = CachedDataset(build_cache(ds, base, tmp_path / "alone", batch_size=2, progress=False))
    workers = CachedDataset(
        build_cache(ds, base, tmp_path / "workers", batch_size=2, num_workers=2, progress=False)
    )
    assert len(alone) == len(workers) == len(ds)
    for i in range(len(ds)):
        a, b = alone[i], workers[i]
        assert a.keys() == b.keys() and a["prompt"] == b["prompt"]
        for k in ("latent_mean", "latent_std", "cond", "context"):
            assert torch.equal(a[k], b[k]), k


def test_each_distinct_prompt_is_encoded_once(tmp_path, fill):
    lines = (fill / "prompt.json").read_text().splitlines()
    same = [json.dumps({**json.loads(x), "prompt": "one" if i % 2 else "two"}) for i, x in enumerate(lines)]
    (tmp_path / "prompt.json").write_text("\n".join(same) + "\n")
    for sub in ("source", "target"):
        (tmp_path / sub).symlink_to(fill / sub)
    base = make_base()
    out = build_cache(open_dataset(tmp_path), base, tmp_path / "cache", batch_size=2, progress=False)
    cached = CachedDataset(out)
    assert cached.meta["distinct_prompts"] == 2
    torch.testing.assert_close(cached[1]["context"], cached[3]["context"], rtol=0, atol=0)
    torch.testing.assert_close(
        cached[0]["context"], base.encode_prompt(["two"]).context[0], rtol=0, atol=1e-5
    )


def test_a_cache_refuses_another_base_or_data_set(fill, tmp_path):
    base, ds = make_base(), open_dataset(fill)
    out = build_cache(ds, base, tmp_path / "cache", batch_size=4, progress=False)
    other = make_base(seed=1)
    assert base_digest(other) != base_digest(base) == base_digest(make_base())
    with pytest.raises(CacheMismatchError, match="another base model"):
        CachedDataset(out, base=other)
    with pytest.raises(CacheMismatchError, match="another data set"):
        CachedDataset(out, dataset=open_dataset(fill, resolution=32))
    with pytest.raises(CacheMismatchError):
        build_cache(ds, other, out, progress=False)
    stamp = (out / "cache.json").stat().st_mtime_ns
    assert build_cache(ds, base, out, progress=False) == out  # up to date: kept as is
    assert (out / "cache.json").stat().st_mtime_ns == stamp
    build_cache(ds, other, out, overwrite=True, progress=False)
    CachedDataset(out, base=other, dataset=ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_cache_depends_on_the_encoders_not_the_denoising_network():
    """The same for a transformer base as for a UNet: training the denoiser (flux-tiny's base
    stage; its text encoders stay frozen) leaves the cache valid for the ControlNet trained on it;
    a changed VAE or text encoder does not."""
    from tiny_flux import tiny_flux_base

    for base in (make_base(), tiny_flux_base()):
        before = base_digest(base)
        with torch.no_grad():
            for p in base.denoiser.parameters():
                p.add_(1.0)
        assert base_digest(base) == before, type(base).__name__
        with torch.no_grad():
            next(base.vae.parameters()).add_(1.0)
        assert base_digest(base) != before, type(base).__name__


def test_a_failed_build_leaves_nothing(fill, tmp_path, monkeypatch):
    base, ds = make_base(), open_dataset(fill)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cache_module.PromptEmbeddings, "cat", staticmethod(broken))
    with pytest.raises(RuntimeError, match="out of memory"):
        build_cache(ds, base, tmp_path / "cache", batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a cache folder"):
        CachedDataset(tmp_path)


def test_items_can_leave_the_conditions_out(tmp_path):
    from controlnet.data import CachedDataset, build_cache, generate, open_dataset
    from tiny import make_base

    ds = open_dataset(generate(tmp_path / "f", 3, size=64, progress=False))
    out = build_cache(ds, make_base(), tmp_path / "c", progress=False)
    assert "cond" in CachedDataset(out)[0] and "cond" not in CachedDataset(out, with_cond=False)[0]
