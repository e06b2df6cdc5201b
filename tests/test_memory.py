"""Memory options: the VAE one image at a time, the tiled VAE, offloaded text encoders and VAE."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import Family
from controlnet.cli import main
from controlnet.families.sd.base import OFFLOADED
from controlnet.generation.check import check
from controlnet.generation.request import GenerationRequest
from controlnet.serving.service import ServeConfig, Service
from tiny import make_base, make_controlnet


def _inputs(module: torch.nn.Module) -> tuple[list[tuple[int, ...]], torch.utils.hooks.RemovableHandle]:
    """The shapes of what ``module`` is called with, recorded from now on (and the hook's handle)."""
    shapes: list[tuple[int, ...]] = []
    handle = module.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


@pytest.fixture(scope="module")
def base():
    return make_base(Family.SD1)  # its VAE's tile: 64 px, 8 latent cells


def test_decode_takes_one_image_at_a_time_and_equals_the_batch_decode(base):
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    shapes, hook = _inputs(base.vae.decoder)
    images = base.decode_latents(latents)
    hook.remove()
    assert shapes == [(1, 4, 16, 16)] * 3  # the decoder's memory does not grow with the batch
    whole = base.vae.decode(latents / base.latent_scale).sample.clamp(-1, 1)
    torch.testing.assert_close(images, whole, rtol=0, atol=1e-5)


def test_encode_takes_one_image_at_a_time_and_equals_the_batch_encode(base):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    shapes, hook = _inputs(base.vae.encoder)
    latents = base.encode_images(images, torch.Generator().manual_seed(2))
    hook.remove()
    assert shapes == [(1, 3, 64, 64)] * 3
    whole = base.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(2)) * base.latent_scale
    torch.testing.assert_close(latents, whole, rtol=0, atol=1e-5)


def test_tiled_decode_never_gives_the_decoder_more_than_a_tile_and_is_diffusers_tiling(base):
    vae, tile = base.vae, base.vae.tile_latent_min_size
    latents = torch.randn(2, 4, 3 * tile, 2 * tile, generator=torch.Generator().manual_seed(3))
    shapes, hook = _inputs(vae.decoder)
    tiled = base.decode_latents(latents, tiled=True)
    hook.remove()
    assert len(shapes) > 2 and all(s[0] == 1 and max(s[2:]) <= tile for s in shapes)
    assert tiled.shape == (2, 3, 3 * tile * 8, 2 * tile * 8)
    vae.enable_tiling()  # what diffusers' pipelines give with tiling on
    try:
        reference = vae.decode(latents / base.latent_scale).sample.clamp(-1, 1)
    finally:
        vae.disable_tiling()
    torch.testing.assert_close(tiled, reference, rtol=0, atol=1e-5)
    # the tiles' own normalisation statistics make it another decode than the whole image's
    assert (tiled - base.decode_latents(latents)).abs().max() > 1e-3
    # latents no larger than a tile are decoded whole, as without tiling
    small = latents[:, :, :tile, :tile]
    assert torch.equal(base.decode_latents(small, tiled=True), base.decode_latents(small))


def test_tiled_encode_never_gives_the_encoder_more_than_a_tile_and_is_diffusers_tiling(base):
    vae, tile = base.vae, base.vae.tile_sample_min_size
    images = torch.rand(1, 3, 2 * tile, 3 * tile, generator=torch.Generator().manual_seed(4)) * 2 - 1
    shapes, hook = _inputs(vae.encoder)
    tiled = base.encode_images(images, torch.Generator().manual_seed(5), tiled=True)
    hook.remove()
    assert len(shapes) > 1 and all(max(s[2:]) <= tile for s in shapes)
    vae.enable_tiling()
    try:
        dist = vae.encode(images).latent_dist
    finally:
        vae.disable_tiling()
    reference = dist.sample(torch.Generator().manual_seed(5)) * base.latent_scale
    torch.testing.assert_close(tiled, reference, rtol=0, atol=1e-5)
    small = images[:, :, :tile, :tile]
    g = torch.Generator().manual_seed(6)
    assert torch.equal(base.encode_images(small, g, tiled=True), base.encode_images(small, g.manual_seed(6)))


def test_offload_keeps_the_text_encoders_and_vae_in_cpu_memory():
    base = make_base(Family.SDXL)  # two text encoders
    assert set(OFFLOADED) == set(base.modules()) - {"unet"}
    base.to("meta", offload=True)  # the meta device stands in for a GPU: it holds no data
    where = {name: next(m.parameters()).device.type for name, m in base.modules().items()}
    assert where == {"unet": "meta", "vae": "cpu", "text_encoder": "cpu", "text_encoder_2": "cpu"}
    base.to("meta")  # without offloading, every part goes
    assert {next(m.parameters()).device.type for m in base.modules().values()} == {"meta"}


def test_a_part_on_the_unets_device_does_not_move_for_its_visit(base):
    before = {name: next(m.parameters()) for name, m in base.modules().items()}
    with base.visiting(*OFFLOADED):
        inside = {name: next(m.parameters()) for name, m in base.modules().items()}
    after = {name: next(m.parameters()) for name, m in base.modules().items()}
    assert all(inside[n] is before[n] and after[n] is before[n] for n in before)  # the same tensors


class Recorded(torch.nn.Module):
    """A network that notes where it is sent and where ``visitor`` is then (and stays put: the
    meta device holds no data)."""

    def __init__(self, log: list[str], visitor: torch.nn.Module) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, device="meta"))
        self.log, self.visitor = log, [visitor]

    def to(self, *args, **kwargs):
        where = torch.device(args[0] if args else kwargs["device"]).type
        self.log.append(f"resident to {where}, visitor on {next(self.visitor[0].parameters()).device.type}")
        return self


def test_a_visit_copies_in_and_drops_the_copies_afterwards():
    from controlnet.model.residence import visiting

    visitor = torch.nn.Linear(3, 2)
    own = [(p, p.data_ptr()) for p in visitor.parameters()]
    card = torch.device("meta")
    with visiting([visitor], [], card):
        assert {p.device.type for p in visitor.parameters()} == {"meta"}
    # its own parameters and their memory are back (the visit read the weights: nothing is copied back)
    assert [(p, p.data_ptr()) for p in visitor.parameters()] == own


def test_residents_step_off_the_card_only_when_a_visitor_would_not_fit(monkeypatch):
    import controlnet.model.residence as residence

    log: list[str] = []
    visitor = torch.nn.Linear(3, 2)
    resident = Recorded(log, visitor)
    for room in (True, False):
        log.clear()
        monkeypatch.setattr(residence, "_room_for", lambda need, card, room=room: room)
        with residence.visiting([visitor], [resident], torch.device("meta")):
            log.append(f"inside, visitor on {next(visitor.parameters()).device.type}")
        if room:
            assert log == ["inside, visitor on meta"]
        else:  # the resident leaves before the visitor comes, and returns after it left
            assert log == [
                "resident to cpu, visitor on cpu",
                "inside, visitor on meta",
                "resident to meta, visitor on cpu",
            ]


def test_a_visit_that_runs_out_of_memory_beside_residents_runs_again_with_them_off(monkeypatch):
    """The room a visit is given counts its weights, not all of its activations (a VAE decoding
    a large image): out of memory with residents beside it, the visit runs once more with them
    stepped off; out of memory without residents to move (none, or they had stepped off), or twice,
    the error stands."""
    import controlnet.model.residence as residence

    monkeypatch.setattr(residence, "_room_for", lambda need, card: True)
    log: list[str] = []
    visitor = torch.nn.Linear(3, 2)
    resident = Recorded(log, visitor)
    card = torch.device("meta")

    def decode(fail: int):
        tries = []

        def fn():
            tries.append(1)
            log.append(f"run {len(tries)}, visitor on {next(visitor.parameters()).device.type}")
            if len(tries) <= fail:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return "image"

        return fn

    assert residence.visit([visitor], [resident], card, decode(fail=1)) == "image"
    assert log == [
        "run 1, visitor on meta",
        "resident to cpu, visitor on cpu",
        "run 2, visitor on meta",
        "resident to meta, visitor on cpu",
    ]
    log.clear()
    with pytest.raises(torch.OutOfMemoryError):  # short of memory even alone
        residence.visit([visitor], [resident], card, decode(fail=2))
    assert log[-1] == "resident to meta, visitor on cpu"  # the resident is back all the same
    log.clear()
    with pytest.raises(torch.OutOfMemoryError):  # no resident to move: nothing to try
        residence.visit([visitor], [], card, decode(fail=1))
    assert log == ["run 1, visitor on meta"]
    log.clear()
    monkeypatch.setattr(residence, "_room_for", lambda need, card: False)
    with pytest.raises(torch.OutOfMemoryError):  # the residents had stepped off already
        residence.visit([visitor], [resident], card, decode(fail=1))
    assert log == [
        "resident to cpu, visitor on cpu",
        "run 1, visitor on meta",
        "resident to meta, visitor on cpu",
    ]


def test_room_counts_free_memory_and_what_the_allocator_holds_unused():
    from controlnet.model.residence import MARGIN, fits_beside

    gib = 2**30
    assert fits_beside(9 * gib, free=9 * gib + MARGIN, cached=0)
    assert not fits_beside(9 * gib, free=9 * gib, cached=0)  # no room left for its activations
    assert fits_beside(9 * gib, free=4 * gib, cached=5 * gib + MARGIN)


def test_controlnets_move_with_the_base_and_are_not_kept_alive_by_it():
    import gc

    base = make_base(Family.SD1)
    cn = make_controlnet(base.unet)
    base.to("meta", offload=True, companions=[cn])
    assert next(cn.parameters()).device.type == "meta"
    with base.visiting("text_encoder"):
        assert base.device.type == "meta" and next(base.text_encoder.parameters()).device.type == "meta"
    assert next(base.text_encoder.parameters()).device.type == "cpu"
    del cn
    gc.collect()
    with base.visiting("text_encoder"):  # a dropped ControlNet is gone, not a resident
        pass


def test_offload_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"offload .* needs a GPU device, got device 'cpu'"):
        check(GenerationRequest(offload=True, device="cpu"))
    check(GenerationRequest(offload=True, device="cuda:1"))  # checked before any model exists
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "c.png")
    cli = ["generate", "--image", str(tmp_path / "c.png"), "--offload", "--device", "cpu", "--quiet"]
    assert main([*cli, "--out", str(tmp_path / "o")]) == 2
    assert "offload" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="offload"):  # a server refuses it at start
        Service(ServeConfig(offload=True, device="cpu"))


def test_vae_tiling_reaches_the_images_and_the_sidecar(base, tmp_path, capsys):
    from controlnet.formats import save_base, save_controlnet

    save_base(base, tmp_path / "base.safetensors")
    save_controlnet(make_controlnet(base.unet, open_zero=True), tmp_path / "cn.safetensors")
    cond = np.zeros((64, 64, 3), np.uint8)
    cond[16:48, 16:48] = 255
    Image.fromarray(cond).save(tmp_path / "cond.png")
    common = ["--base", str(tmp_path / "base.safetensors"), "--controlnet", str(tmp_path / "cn.safetensors")]
    common += ["--image", str(tmp_path / "cond.png"), "--steps", "2", "--seed", "3", "--quiet"]
    images = {}
    for name, size, extra in (
        ("plain", "192", ()),
        ("tiled", "192", ("--vae-tiling",)),
        ("one-tile", "64", ()),
    ):
        for tiling in ((), ("--vae-tiling",)) if name == "one-tile" else ((),):
            out = tmp_path / f"{name}{len(tiling)}"
            assert main(["generate", *common, "--resolution", size, *extra, *tiling, "--out", str(out)]) == 0
            record = json.loads(next(out.glob("*.json")).read_text())
            assert record["request"]["vae_tiling"] is bool(extra or tiling)
            images[out.name] = np.asarray(Image.open(out / record["outputs"]["images"][0]["file"]))
    assert not np.array_equal(images["plain0"], images["tiled0"])  # the same latents, decoded in tiles
    assert np.array_equal(images["one-tile0"], images["one-tile1"])  # no larger than a tile: whole
    sidecar = next((tmp_path / "tiled0").glob("*.json"))
    assert (
        main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    )
    assert "bit-identical" in capsys.readouterr().out
