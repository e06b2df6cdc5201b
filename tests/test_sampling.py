"""The denoising loop: seeds, windows, modes, several controls, img2img, masks, samplers."""

import pytest
import torch

from controlnet import Family
from controlnet.choices import Sampler
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import denoise
from controlnet.model.control import Control
from tiny import make_base, make_controlnet

LAT = (8, 8)


@pytest.fixture(scope="module")
def world():
    base = make_base(Family.SD1)
    cns = [make_controlnet(base.unet, open_zero=True, seed=s) for s in (5, 6)]
    cond = base.encode_prompt(["a red circle"])
    uncond = base.encode_prompt([""])
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 64, 64, generator=g) for _ in cns]
    return base, cns, cond, uncond, images


def run(world, units=(), **kw):
    base, _, cond, uncond, _ = world
    kw.setdefault("steps", 6)
    kw.setdefault("seeds", [7])
    if len(kw["seeds"]) > 1:
        cond, uncond = cond.repeat(len(kw["seeds"])), uncond.repeat(len(kw["seeds"]))
    return denoise(base, cond, uncond, list(units), latent_size=LAT, progress=False, **kw)


def unit(world, i=0, **kw):
    return ControlUnit(world[1][i], world[4][i], **kw)


def count_calls(cn):
    calls = []
    handle = cn.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls, handle


def test_same_seed_same_latents_and_seeds_differ(world):
    a, b = run(world, [unit(world)]), run(world, [unit(world)])
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, run(world, [unit(world)], seeds=[8]).latents)


def test_strength_zero_equals_no_controlnet_and_never_runs_it(world):
    calls, h = count_calls(world[1][0])
    out = run(world, [unit(world, strength=0.0)])
    h.remove()
    assert calls == []
    assert torch.equal(out.latents, run(world, []).latents)
    assert not torch.equal(run(world, [unit(world)]).latents, out.latents)


def test_window_runs_only_its_steps_and_equals_scale_zero_outside(world, monkeypatch):
    calls, h = count_calls(world[1][0])
    windowed = run(world, [unit(world, start=0.25, end=0.75)], steps=8)
    assert len(calls) == 4 and windowed.control_calls == {0: 4}  # steps 2..5 of 8
    # Force the ControlNet to run at every step, with all-zero scales outside the window.
    from controlnet.generation import sampling

    original = sampling.PreparedControl.at

    def always(self, step, total, cfg):
        c = original(self, 2, total, cfg)  # a step inside the window: a full control
        if self.unit.in_window(step, total):
            return c
        return Control(c.controlnet, c.hint, [0.0] * len(c.scales), c.conditional_only)

    monkeypatch.setattr(sampling.PreparedControl, "at", always)
    monkeypatch.setattr(Control, "active", property(lambda self: True))
    calls.clear()
    forced = run(world, [unit(world, start=0.25, end=0.75)], steps=8)
    h.remove()
    assert len(calls) == 8
    assert torch.equal(forced.latents, windowed.latents)


def test_guess_mode_runs_on_the_conditional_half_only(world):
    calls, h = count_calls(world[1][0])
    run(world, [unit(world, guess_mode=True)], seeds=[1, 2], steps=3)
    run(world, [unit(world, mode="prompt")], seeds=[1, 2], steps=3)
    h.remove()
    assert calls == [2] * 3 + [4] * 3  # two samples: cond half = 2 rows, both halves = 4


def test_shuffle_style_global_pool_runs_conditional_only(world):
    base = world[0]
    pooled = make_controlnet(base.unet, open_zero=True, global_pool=True)
    calls, h = count_calls(pooled)
    run(world, [ControlUnit(pooled, world[4][0])], seeds=[1, 2], steps=2)
    h.remove()
    assert calls == [2, 2]


def test_two_units_add_up(world):
    # The same ControlNet and image twice at strengths a and b == once at a + b.
    two = run(world, [unit(world, strength=0.4), unit(world, strength=0.7)])
    one = run(world, [unit(world, strength=1.1)])
    torch.testing.assert_close(two.latents, one.latents, rtol=1e-4, atol=1e-5)
    different = run(world, [unit(world, 0, strength=0.4), unit(world, 1, strength=0.7)])
    assert not torch.allclose(different.latents, one.latents)


def test_img2img_runs_part_of_the_schedule(world):
    src = torch.randn(1, 4, *LAT)
    out = run(world, steps=10, init_latents=src, denoise_strength=0.3)
    assert out.steps_run == 3
    # at low strength the result stays near the source; at full strength it does not
    near = (out.latents - src).norm()
    far = (run(world, steps=10, init_latents=src, denoise_strength=1.0).latents - src).norm()
    assert near < far


def test_mask_keeps_the_unmasked_latents(world):
    src = torch.randn(1, 4, *LAT)
    mask = torch.zeros(1, 1, *LAT)
    mask[..., 2:6, 2:6] = 1
    out = run(world, [unit(world)], init_latents=src, mask=mask).latents
    keep = mask.expand_as(out) == 0
    assert torch.equal(out[keep], src.expand_as(out)[keep])
    assert not torch.allclose(out[~keep], src.expand_as(out)[~keep])


@pytest.mark.parametrize("sampler", list(Sampler), ids=lambda s: s.value)
def test_every_sampler_runs_and_reproduces(world, sampler):
    kw = {"sampler": sampler, "eta": 0.5, "steps": 4}
    a, b = run(world, [unit(world)], **kw), run(world, [unit(world)], **kw)
    assert torch.isfinite(a.latents).all() and torch.equal(a.latents, b.latents)


def test_a_region_reaches_the_step_graphs_as_an_input(world):
    """A control's region is fed to the cached step graphs through their inputs (a graph must not
    keep the first generation's region): cached equals eager, another region in the same cache
    gives its own result, and a region of ones equals none."""
    from controlnet.model.fastpath import release_graphs, step_graphs

    base = world[0]
    release_graphs(base.unet)
    left, right = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64)
    left[..., :32], right[..., 32:] = 1, 1
    out = {}
    for name, region in (
        ("left", left),
        ("right", right),
        ("ones", torch.ones(1, 1, 64, 64)),
        ("none", None),
    ):
        eager = run(world, [unit(world, region=region)], cuda_graphs=False).latents
        cached = run(world, [unit(world, region=region)], cuda_graphs=True).latents
        assert torch.equal(eager, cached), name
        out[name] = eager
    assert torch.equal(out["ones"], out["none"])
    assert not torch.equal(out["left"], out["right"]) and not torch.equal(out["left"], out["none"])
    keys = [k for k in step_graphs(base.unet, base.device).entries]
    assert any("region0" in str(k) for k in keys)
    with pytest.raises(ValueError, match=r"a control region must be \(1, 1, H, W\), got \(64, 64\)"):
        unit(world, region=torch.ones(64, 64))


def test_bad_arguments(world):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        run(world, steps=0)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        run(world, sampler="plms")
    with pytest.raises(ValueError, match="dpmpp-2m-sde-karras sampler places its steps by Karras"):
        run(world, sampler="dpmpp-2m-sde-karras", timestep_spacing="leading")
    with pytest.raises(ValueError, match="the lcm sampler takes its steps from the 50-step schedule"):
        run(world, sampler="lcm", timestep_spacing="trailing")
    run(world, sampler="lcm", steps=50)  # its whole distillation schedule
    with pytest.raises(ValueError, match="the lcm sampler takes at most 50 steps"):
        run(world, sampler="lcm", steps=51)
    with pytest.raises(ValueError, match="strength must be >= 0"):
        unit(world, strength=-1)
    with pytest.raises(ValueError, match=r"start 0\.8 is after its end 0\.2"):
        unit(world, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="a mask needs an init image"):
        run(world, mask=torch.ones(1, 1, *LAT))


def test_step_graphs_equal_eager_and_are_captured_once_across_generations(world):
    """On CPU the cache runs the step on its static buffers: the GPU path's plumbing, minus the
    graph. Graphs are kept on the UNet: later generations with other prompts, seeds and condition
    images replay them; other scales or moved weights get graphs of their own."""
    from controlnet.model.fastpath import release_graphs, step_graphs

    base, cns = world[0], world[1]
    release_graphs(base.unet)
    units = [unit(world, start=0.0, end=0.5), unit(world, 1, start=0.25, end=1.0, guess_mode=True)]
    for sampler in ("ddim", "euler-a", "dpmpp-2m-karras"):
        eager = run(world, units, steps=8, sampler=sampler, cuda_graphs=False, seeds=[3, 4])
        cached = run(world, units, steps=8, sampler=sampler, cuda_graphs=True, seeds=[3, 4])
        assert torch.equal(eager.latents, cached.latents)
    cache = step_graphs(base.unet, base.device)
    # active sets over 8 steps: {0}, {0, 1}, {1} -> three captures, replayed by the later samplers
    assert cache.captures == 3

    # another prompt and other condition images: replayed, and what they read is the new inputs
    g = torch.Generator().manual_seed(9)
    other = [
        ControlUnit(
            u.controlnet, torch.rand(1, 3, 64, 64, generator=g), start=u.start, end=u.end, mode=u.mode
        )
        for u in units
    ]
    prompt = base.encode_prompt(["a blue square"]).repeat(2)
    uncond = world[3].repeat(2)
    kw = {"steps": 8, "seeds": [5, 6], "latent_size": LAT, "progress": False}
    eager = denoise(base, prompt, uncond, other, cuda_graphs=False, **kw)
    cached = denoise(base, prompt, uncond, other, cuda_graphs=True, **kw)
    assert torch.equal(eager.latents, cached.latents)
    assert cache.captures == 3

    # another strength is another graph (the scales are constants in it)
    run(world, [unit(world, strength=0.5)], steps=2, cuda_graphs=True)
    assert cache.captures == 4
    # a parameter replaced by a new tensor (same values, new address): the old graphs may not run
    mid = cns[0].controlnet_mid_block
    mid.weight = torch.nn.Parameter(mid.weight.detach().clone())
    run(world, [unit(world, strength=0.5)], steps=2, cuda_graphs=True)
    assert cache.captures == 5
    release_graphs(base.unet)
    assert step_graphs(base.unet, base.device) is not cache


def test_compile_modes_and_who_replays_its_own_graphs():
    """A module compiled in reduce-overhead mode replays inductor's CUDA graphs, so the sampler must
    not capture its own graph around it; the default mode leaves graphing to the sampler."""
    from controlnet.model.fastpath import compile_modules, has_own_graphs

    fused, graphed = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)
    compile_modules([fused])
    compile_modules([graphed], mode="reduce-overhead")
    assert not has_own_graphs([fused]) and has_own_graphs([fused, graphed])
    compile_modules([graphed])  # already compiled: left as it is
    assert has_own_graphs([graphed])
    with pytest.raises(ValueError, match="compile mode must be one of default, reduce-overhead"):
        compile_modules([torch.nn.Conv2d(4, 4, 1)], mode="max-autotune")


def test_networks_that_replay_their_own_graphs_run_one_after_the_other(world, monkeypatch):
    """Networks compiled in reduce-overhead mode (training's) share inductor's one-stream memory
    pool, so the sampler does not put them on side streams; the latents are the same either way."""
    import controlnet.families.sd.forward as forward

    seen = []
    real = forward.controlled_unet_forward

    def spy(*args, **kw):
        seen.append(kw["concurrent"])
        return real(*args, **kw)

    monkeypatch.setattr(forward, "controlled_unet_forward", spy)
    plain = run(world, [unit(world)], steps=2, cuda_graphs=False)
    assert seen == [True, True]
    monkeypatch.setattr(world[0].unet, "_controlnet_compiled", "reduce-overhead", raising=False)
    seen.clear()
    own = run(world, [unit(world)], steps=2, cuda_graphs=False)
    assert seen == [False, False]
    torch.testing.assert_close(own.latents, plain.latents, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the loop and its callable
def test_the_loop_calls_any_model_callable_once_per_step():
    """sample() is a plain loop over ``model(x, t, step)``: any callable will do."""
    from controlnet.families.sd.base import DEFAULT_SCHEDULE
    from controlnet.families.sd.schedulers import make_scheduler
    from controlnet.generation.sampling import sample

    scheduler = make_scheduler(Sampler.DDIM, DEFAULT_SCHEDULE)
    scheduler.set_timesteps(5)
    seen = []

    def model(x, t, step):
        seen.append((tuple(x.shape), float(t), step))
        return torch.zeros_like(x)

    latents = torch.ones(2, 4, *LAT)
    out = sample(
        model, scheduler, latents, scheduler.timesteps, dtype=torch.float32, step_kwargs={}, progress=False
    )
    assert [s for *_, s in seen] == [0, 1, 2, 3, 4]
    assert [t for _, t, _ in seen] == [float(t) for t in scheduler.timesteps]
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_guidance_wraps_the_controlled_model(world):
    """Guided(model, g) at g = 0 is the unconditional prediction and at g = 1 the conditional one:
    classifier-free guidance is a wrapper around the callable, not part of the loop."""
    from controlnet.families.protocol import PromptEmbeddings
    from controlnet.generation.denoiser import ControlledDenoiser, Guided, PreparedControl

    base, _, cond, uncond, _ = world
    prepared = [PreparedControl.build(unit(world), 1, base.device, base.dtype, base)]
    both = ControlledDenoiser(base, prepared, PromptEmbeddings.cat([uncond, cond]), 4, cfg_batch=True)
    x, t = torch.randn(1, 4, *LAT, generator=torch.Generator().manual_seed(1)), torch.tensor(500.0)
    for g, alone in ((0.0, uncond), (1.0, cond)):
        half = ControlledDenoiser(base, prepared, alone, 4, cfg_batch=False)
        torch.testing.assert_close(Guided(both, g)(x, t, 0), half(x, t, 0), rtol=1e-5, atol=1e-5)


def test_guidance_ends_and_caps_its_norm(world):
    """Guided(..., guided=, alone=) runs the steps it does not guide on the conditional half
    alone; renorm r scales each sample's guided prediction down to r times the conditional's norm
    where it is larger. In the loop, guidance_end picks the steps by how far along they are."""
    from controlnet.generation.denoiser import Guided, StepModel

    class Halves(StepModel):  # unconditional half: x, conditional half: 3 x
        def plan(self, step):
            return (), {}

        def forward(self, inputs, key):
            x = inputs["x"]
            half = x.shape[0] // 2
            return torch.cat([x[:half], 3 * x[half:]]) if self is both else 3 * x

    both, alone = Halves(), Halves()
    x, t = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.tensor(0.0)
    model = Guided(both, 4.0, alone=alone, guided=[True, False])
    torch.testing.assert_close(model(x, t, 0), 9 * x)  # 1 + 4 (3 - 1)
    torch.testing.assert_close(model(x, t, 1), 3 * x)  # the conditional prediction alone
    torch.testing.assert_close(Guided(both, 4.0, renorm=2.0)(x, t, 0), 6 * x)  # capped at 2 x 3
    torch.testing.assert_close(Guided(both, 4.0, renorm=5.0)(x, t, 0), 9 * x)  # under the cap
    # in the loop: 6 DDIM steps at timesteps 831, 665, 499, 333, 167, 1 - guided while 1 - t/1000
    # is at most 0.502: the first three (both halves), then the conditional half alone
    calls, handle = count_calls(world[0].unet)
    try:
        run(world, guidance_end=0.502)
    finally:
        handle.remove()
    assert calls == [2, 2, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="guidance_end must be in"):
        run(world, guidance_end=1.5)


def test_a_card_without_room_for_a_graph_runs_the_steps_without_one(monkeypatch):
    """A capture that runs out of GPU memory (the warm-up ran; the graph's own pool did not fit)
    leaves the cache capturing nothing more: one warning, and every step runs as it is, giving
    what the function gives. Any other capture error still reaches the caller."""
    from controlnet.model.fastpath import GraphCache

    cache = GraphCache(torch.device("cpu"))
    cache.use_graphs = True  # as on a GPU; the capture below fails as a full card's would

    def full_card(fn, statics):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:  # the graph's end failing after it, as torch reports it
            raise RuntimeError("operation failed due to a previous error during capture") from None

    monkeypatch.setattr(cache, "_capture", full_card)
    calls = []

    def step(inputs):
        calls.append(1)
        return inputs["x"] * 2

    x = torch.arange(4.0)
    with pytest.warns(UserWarning, match="no room for the denoising step's CUDA graph"):
        assert torch.equal(cache.run("k", step, {"x": x}), x * 2)
    assert not cache.use_graphs
    assert torch.equal(cache.run("k", step, {"x": x + 1}), (x + 1) * 2) and len(calls) == 2

    other = GraphCache(torch.device("cpu"))
    other.use_graphs = True

    def broken(fn, statics):
        raise RuntimeError("an illegal memory access was encountered")

    monkeypatch.setattr(other, "_capture", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        other.run("k", step, {"x": x})


def test_graphed_steps_replay_the_same_computation_per_active_set(world):
    """Graphed(model) computes what the model computes (on a CPU: from its static buffers), one
    cache entry per distinct set of active controls."""
    from controlnet.families.protocol import PromptEmbeddings
    from controlnet.generation.denoiser import ControlledDenoiser, Graphed, Guided, PreparedControl
    from controlnet.model.fastpath import GraphCache

    base, _, cond, uncond, _ = world
    prepared = [PreparedControl.build(unit(world, end=0.5), 1, base.device, base.dtype, base)]
    model = Guided(
        ControlledDenoiser(base, prepared, PromptEmbeddings.cat([uncond, cond]), 4, cfg_batch=True), 7.5
    )
    graphs = GraphCache(torch.device("cpu"))
    graphed = Graphed(model, graphs, "key")
    x = torch.randn(1, 4, *LAT, generator=torch.Generator().manual_seed(2))
    for step in range(4):  # the control acts in steps 0-1, not in 2-3
        assert torch.equal(graphed(x, torch.tensor(300.0), step), model(x, torch.tensor(300.0), step))
    assert graphs.captures == 2
