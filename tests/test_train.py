"""The training loop: learning, locked weights, exact resume, DDP equivalence, checkpoints."""

import csv
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from circles import Circles
from controlnet.families.sd.forward import decoder_parameters
from controlnet.training.checkpoints import latest_checkpoint, load_checkpoint
from controlnet.training.objectives import ControlNetObjective, StepNoise
from controlnet.training.stopping import StopRequests
from controlnet.training.train import TrainConfig, train
from launch import two_processes
from tiny import make_base, make_controlnet

HERE = Path(__file__).parent


def setup(**kw):
    torch.manual_seed(0)
    base = make_base()
    return base, ControlNetObjective(base, make_controlnet(base.unet), **kw)


def config(tmp_path, name="run", **kw):
    kw = {
        "steps": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "cpu": True,
        "progress": False,
        "log_every": 1,
        "checkpoint_every": 100,
        **kw,
    }
    return TrainConfig(out=str(tmp_path / name), **kw)


def digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.cpu().numpy().tobytes())
    return h.hexdigest()


def fixed_loss(objective, data):
    items = [data[i] for i in range(8)]
    batch = {
        k: [it[k] for it in items] if k == "prompt" else torch.stack([it[k] for it in items])
        for k in items[0]
        if k != "index"
    }
    with torch.no_grad():
        return sum(objective(batch, StepNoise(99, s, 0, 8, slice(0, 8), "cpu")).item() for s in range(8)) / 8


def loss_rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [(r["step"], r["value"]) for r in csv.DictReader(f) if r["name"] == "loss"]


def test_loss_falls_and_locked_weights_never_change(tmp_path):
    base, obj = setup(empty_prompt_prob=0.0)
    data = Circles(64, latents=True)  # posterior moments given, as with a latent cache
    before = fixed_loss(obj, data)
    locked = {n: digest(m) for n, m in base.modules().items()}
    train(config(tmp_path, steps=30, lr=2e-3), obj, data)
    assert fixed_loss(obj, data) < 0.9 * before
    assert {n: digest(m) for n, m in base.modules().items()} == locked
    assert any(z.weight.abs().sum() > 0 for z in obj.controlnet.zero_convs())
    assert (tmp_path / "run" / "loss.png").is_file()


def test_unlocked_decoder_trains_and_encoder_stays(tmp_path):
    base, obj = setup(sd_locked=False)
    enc = {
        n: p.clone() for n, p in base.unet.named_parameters() if n.startswith(("down_blocks", "mid_block"))
    }
    dec = {n: p.clone() for n, p in decoder_parameters(base.unet)}
    train(config(tmp_path, steps=2, decoder_lr=1e-3), obj, Circles(8))
    params = dict(base.unet.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in enc.items())
    assert any(not torch.equal(params[n], v) for n, v in dec.items())
    assert any(k.startswith("unet.up_blocks") for k in obj.trainable_state())


def test_compiled_training_switches_group_norms_and_trains_the_same(tmp_path, monkeypatch):
    """--compile switches the networks' GroupNorms to the channels-last formulation (the compiler
    itself is stubbed out: CPU compilation of a training step takes minutes); the switched
    networks in channels-last memory train to the same weights as the plain ones."""
    from controlnet.model.channels_last_norm import ChannelsLastGroupNorm

    _, plain = setup()
    train(config(tmp_path, "plain", steps=2), plain, Circles(8))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    _, switched = setup()
    train(config(tmp_path, "compiled", steps=2, compile=True), switched, Circles(8))
    norms = [m for net in switched.networks() for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is ChannelsLastGroupNorm for m in norms)
    a, b = plain.trainable_state(), switched.trainable_state()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split,workers", [(3, 0), (6, 2)])
def test_resume_continues_bit_identically(tmp_path, split, workers):
    # 16 items at batch 4 (4 batches an epoch): split 3 resumes within the first epoch, split 6
    # within the second (with loader workers, which read ahead of what the loop has taken)
    kw = {"checkpoint_every": split, "ema_decay": 0.9, "num_workers": workers}
    _, full = setup()
    train(config(tmp_path, "full", steps=2 * split, **kw), full, Circles(16))
    _, part = setup()
    train(config(tmp_path, "part", steps=split, **kw), part, Circles(16))
    _, resumed = setup()
    train(config(tmp_path, "part", steps=2 * split, resume=True, **kw), resumed, Circles(16))
    a, b = full.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loss_rows(tmp_path / "full") == loss_rows(tmp_path / "part")
    ca, cb = (
        load_checkpoint(tmp_path / "full" / f"checkpoint-{2 * split:08d}"),
        load_checkpoint(latest_checkpoint(tmp_path / "part")),
    )
    assert all(torch.equal(ca.ema[k], cb.ema[k]) for k in ca.ema)
    for k, v in ca.optimizer_state["state"].items():
        assert all(torch.equal(v[f], cb.optimizer_state["state"][k][f]) for f in v if torch.is_tensor(v[f]))


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_two_process_ddp_equals_one_process(tmp_path, family):
    from ddp_train_script import objective_for

    done = two_processes(str(HERE / "ddp_train_script.py"), str(tmp_path / "ddp"), "2", family)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (
        load_file(tmp_path / "ddp" / "rank0.safetensors"),
        load_file(tmp_path / "ddp" / "rank1.safetensors"),
    )
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # replicas identical
    single = objective_for(family)
    init = {k: v.clone() for k, v in single.trainable_state().items()}
    train(config(tmp_path, "single", steps=3, batch_size=4), single, Circles(16))
    # the same data and noise: every step's global loss matches
    ddp_losses, one_losses = loss_rows(tmp_path / "ddp"), loss_rows(tmp_path / "single")
    assert [r[0] for r in ddp_losses] == [r[0] for r in one_losses] == ["1", "2", "3"]
    for (_, a), (_, b) in zip(ddp_losses, one_losses):
        assert abs(float(a) - float(b)) <= 1e-4 * abs(float(b))
    assert_trained_alike(r0, single.trainable_state(), init)


def assert_trained_alike(got, want, init, overall=1e-3):
    """The same weights up to summation order. Adam turns float noise on near-zero gradients (all
    of the copy at first) into visible relative changes, so measure against how far training
    moved each tensor: a sharding or sync bug would differ by about the movement itself.
    ``overall``: the summed difference's bound, as a share of the summed movement."""
    assert got.keys() == want.keys()
    diff = moved = 0.0
    for k in want:
        d, m = (got[k] - want[k]).norm().item(), (want[k] - init[k]).norm().item()
        assert d <= 0.02 * m + 1e-9, (k, d, m)
        diff, moved = diff + d, moved + m
    assert moved > 0 and diff <= overall * moved


def run_sharded(tmp_path, name, steps, *extra, family="flux"):
    """A tiny ControlNet trained by two processes with its weights sharded (FSDP2)."""
    script = str(HERE / "ddp_train_script.py")
    done = two_processes(script, str(tmp_path / name), "2", f"{family}-fsdp", str(steps), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name


def trained_unsharded(tmp_path, name, steps, family="flux", **kw):
    """The same run on one process holding every weight (batch 4 = 2 processes x 2)."""
    from controlnet.training.validation import ControlValidator
    from ddp_train_script import SAMPLERS, objective_for

    single = objective_for(family)
    init = {k: v.clone() for k, v in single.trainable_state().items()}
    data = Circles(18)
    validator = ControlValidator(data, 2, steps=2, sampler=SAMPLERS[family], guidance=1.0)
    kw = {"checkpoint_every": 2, "ema_decay": 0.9, "validate_every": 2, "validation_count": 2, **kw}
    train(config(tmp_path, name, steps=steps, batch_size=4, **kw), single, data, validator=validator)
    return single, init


def metric_rows(run_dir, name):
    with open(Path(run_dir) / "metrics.csv") as f:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == name]


@pytest.mark.parametrize("family,accum", [("flux", False), ("unet", False), ("flux", True)])
def test_fsdp_shards_every_weight_and_trains_as_one_process(tmp_path, family, accum):
    """accelerate's FSDP2 over two processes: each holds about half of every ControlNet weight,
    and the run (losses, validation, whole-tensor checkpoints, EMA, the export) is the run one
    process makes with every weight; also with gradient checkpointing, accumulation and clipping."""
    import json

    from ddp_train_script import ACCUM

    run = run_sharded(tmp_path, "fsdp", 4, *(["accum"] if accum else []), family=family)
    report = json.loads((run / "rank0.json").read_text())
    # the root and every block of the base and of the ControlNet, each a unit
    assert any("controlnet." in b for b in report["blocks"]) and len(report["blocks"]) >= 4
    assert report["units"] == ["", *report["blocks"]]
    held = [json.loads((run / f"rank{r}.json").read_text())["held"] for r in (0, 1)]
    for name, (local, whole) in held[0].items():
        assert local + held[1][name][0] == whole, name  # the two slices make the weight
    total = sum(whole for _, whole in held[0].values())
    assert sum(local for local, _ in held[0].values()) < 0.6 * total  # each holds about half
    single, init = trained_unsharded(tmp_path, "single", 4, family, **(ACCUM if accum else {}))
    for name in ("loss", "val_loss"):
        got, want = metric_rows(run, name), metric_rows(tmp_path / "single", name)
        assert [s for s, _ in got] == [s for s, _ in want] == ([1, 2, 3, 4] if name == "loss" else [2, 4])
        assert all(abs(a - b) <= 1e-4 * abs(b) for (_, a), (_, b) in zip(got, want)), name
    assert (run / "samples" / "step-00000004.png").is_file()
    sharded, whole = (
        load_checkpoint(run / "checkpoint-00000004"),
        load_checkpoint(tmp_path / "single" / "checkpoint-00000004"),
    )
    assert {k: v.shape for k, v in sharded.trainable.items()} == {
        k: v.shape for k, v in whole.trainable.items()
    }
    # (bfloat16 rounds to 2^-8, 0.4%, where float32 rounds to 2^-24: its summation order shows more)
    assert_trained_alike(sharded.trainable, single.trainable_state(), init, overall=1e-2)
    assert_trained_alike(sharded.ema, whole.ema, init)
    moments = sharded.optimizer_state["state"]
    assert moments.keys() == whole.optimizer_state["state"].keys()
    assert all(
        v["exp_avg"].shape == whole.optimizer_state["state"][k]["exp_avg"].shape for k, v in moments.items()
    )
    exported = load_file(run / "final" / "controlnet.safetensors")  # the EMA weights, whole
    assert exported.keys() == {k.removeprefix("controlnet.") for k in sharded.ema}
    assert all(torch.equal(exported[k.removeprefix("controlnet.")], v) for k, v in sharded.ema.items())


def test_fsdp_in_bfloat16_trains_as_one_process_does(tmp_path):
    """The precision GPUs train in: the locked base stored in bfloat16 beside the float32
    ControlNet (units that hold both dtypes), under bf16 autocast; the sharded run's losses are
    one process's to bfloat16's rounding, and its checkpoints hold the whole float32 weights."""
    run = run_sharded(tmp_path, "fsdp", 4, "bf16")
    single, init = trained_unsharded(tmp_path, "single", 4, mixed_precision="bfloat16")
    for name in ("loss", "val_loss"):
        got, want = metric_rows(run, name), metric_rows(tmp_path / "single", name)
        assert [s for s, _ in got] == [s for s, _ in want] and got, name
        assert all(abs(a - b) <= 1e-3 * abs(b) for (_, a), (_, b) in zip(got, want)), (name, got, want)
    sharded = load_checkpoint(run / "checkpoint-00000004")
    whole = load_checkpoint(tmp_path / "single" / "checkpoint-00000004")
    assert {k: (v.shape, v.dtype) for k, v in sharded.trainable.items()} == {
        k: (v.shape, torch.float32) for k, v in whole.trainable.items()
    }
    # (bfloat16 rounds to 2^-8, 0.4%, where float32 rounds to 2^-24: its summation order shows more)
    assert_trained_alike(sharded.trainable, single.trainable_state(), init, overall=1e-2)


def test_fsdp_resumes_bit_identically_and_on_any_number_of_processes(tmp_path):
    """A sharded run stopped at step 2 and resumed by two processes ends where the uninterrupted
    one does, bit for bit; its step-2 checkpoint (whole tensors) resumed by one process ends where
    one process's own run does."""
    full, part = run_sharded(tmp_path, "full", 4), run_sharded(tmp_path, "part", 2)
    shutil.copytree(part, tmp_path / "moved")
    run_sharded(tmp_path, "part", 4, "resume")
    a, b = load_checkpoint(full / "checkpoint-00000004"), load_checkpoint(part / "checkpoint-00000004")
    for x, y in ((a.trainable, b.trainable), (a.ema, b.ema)):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for k, v in a.optimizer_state["state"].items():
        assert all(torch.equal(v[f], b.optimizer_state["state"][k][f]) for f in ("exp_avg", "exp_avg_sq"))
    assert metric_rows(full, "loss") == metric_rows(part, "loss")
    single, init = trained_unsharded(tmp_path, "single", 4)
    moved, _ = trained_unsharded(tmp_path, "moved", 4, resume=True)
    assert_trained_alike(moved.trainable_state(), single.trainable_state(), init)


def test_sharding_refuses_fsdp1_and_whole_model_objectives():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from controlnet.training.objectives import BaseObjective
    from controlnet.training.sharding import prepare_sharding

    def accel(version):
        plugin = SimpleNamespace(fsdp_version=version, mixed_precision_policy=None)
        return SimpleNamespace(
            distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin)
        )

    base, obj = setup()
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        prepare_sharding(accel(1), obj)
    with pytest.raises(ValueError, match="BaseObjective trains and exports a whole model"):
        prepare_sharding(accel(2), BaseObjective(base))
    sharded = accel(2)
    prepare_sharding(sharded, obj)  # a ControlNet: sharded, in the objective's own precision
    assert sharded.state.fsdp_plugin.mixed_precision_policy.param_dtype is None


def signalling(at: int, times: int = 1):
    """A validator that sends this process SIGTERM ``times`` times at step ``at``, as a scheduler
    ending the job (or Ctrl-C) would."""

    def validator(objective, step, out_dir):
        if step != at:
            return {}
        for i in range(times):
            if i:  # a second request, not the same one reaching the process twice
                time.sleep(StopRequests.SAME_REQUEST_S + 0.2)
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    return validator


def test_a_signal_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(tmp_path):
    from controlnet.training.train import TrainingStopped

    kw = {"validate_every": 1, "validation_count": 0}
    _, full = setup()
    train(config(tmp_path, "full", steps=5, **kw), full, Circles(16), validator=signalling(-1))
    _, part = setup()
    handler = signal.getsignal(signal.SIGTERM)
    stopped = r"SIGTERM: stopped after step 2 of 5, checkpoint-00000002 .*--resume"
    with pytest.raises(TrainingStopped, match=stopped):
        train(config(tmp_path, "part", steps=5, **kw), part, Circles(16), validator=signalling(2))
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handler is back
    assert latest_checkpoint(tmp_path / "part").name == "checkpoint-00000002"
    assert not (tmp_path / "part" / "final").exists()
    _, resumed = setup()
    again = config(tmp_path, "part", steps=5, resume=True, **kw)
    train(again, resumed, Circles(16), validator=signalling(-1))
    a, b = full.trainable_state(), resumed.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loss_rows(tmp_path / "full") == loss_rows(tmp_path / "part")


GROUP_SIGNALLED = """
import subprocess, sys
sys.path.insert(0, sys.argv[2])
import os
import test_train as t
from controlnet.training.train import TrainingStopped

def kill_group(objective, step, out_dir):  # the way `timeout` or a terminal's Ctrl-C signals
    if step == 2:
        subprocess.run([sys.executable, "-c", f"import os; os.killpg({os.getpgrp()}, 15)"])
    return {}

_, objective = t.setup()
cfg = t.config(t.Path(sys.argv[1]), steps=5, validate_every=1, validation_count=0, num_workers=2)
try:
    t.train(cfg, objective, t.Circles(16), validator=kill_group)
except TrainingStopped as e:
    print(e)
"""


def test_a_signal_to_the_process_group_stops_the_run_not_its_loader_workers(tmp_path):
    """SIGTERM to the whole group (as `timeout` sends it) reaches the data loader's workers too:
    they stay, the run stops after the step with a checkpoint."""
    cmd = [sys.executable, "-c", GROUP_SIGNALLED, str(tmp_path), str(HERE)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("SIGTERM: stopped after step 2 of 5, checkpoint-00000002 written")
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-00000002"


def test_the_same_request_arriving_twice_is_one_request(tmp_path):
    """A launcher (torchrun) passes on the SIGTERM its process group also got: the process sees
    two at once, and still stops after the step with a checkpoint."""
    from controlnet.training.train import TrainingStopped

    def twice(objective, step, out_dir):
        for _ in range(2 if step == 2 else 0):
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    _, obj = setup()
    cfg = config(tmp_path, steps=5, validate_every=1, validation_count=0)
    with pytest.raises(TrainingStopped, match="stopped after step 2 of 5"):
        train(cfg, obj, Circles(16), validator=twice)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-00000002"


def test_a_second_signal_stops_at_once(tmp_path):
    _, obj = setup()
    kw = {"validate_every": 1, "validation_count": 0}
    with pytest.raises(KeyboardInterrupt, match="SIGTERM again: stopped at once") as caught:
        train(config(tmp_path, steps=5, **kw), obj, Circles(16), validator=signalling(2, times=2))
    assert type(caught.value) is KeyboardInterrupt
    assert latest_checkpoint(tmp_path / "run") is None


def test_processes_stop_together_when_one_is_signalled(tmp_path):
    """Only the second of two processes gets SIGTERM (in step 2): both stop after the same step
    (the next one where they meet, logging every 2) and write one checkpoint."""
    done = two_processes(str(HERE / "ddp_train_script.py"), str(tmp_path / "ddp"), "2", "unet-stop")
    assert done.returncode == 0, done.stderr[-3000:]
    said = [(tmp_path / "ddp" / f"rank{r}.stopped").read_text() for r in (0, 1)]
    assert said[0].startswith("a signal to another process: stopped after step 2 of 4")
    assert said[1].startswith("SIGTERM: stopped after step 2 of 4")
    assert latest_checkpoint(tmp_path / "ddp").name == "checkpoint-00000002"


def test_a_failed_checkpoint_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    _, obj = setup()
    run = tmp_path / "run"
    train(config(tmp_path, steps=2, checkpoint_every=2), obj, Circles(8))
    assert latest_checkpoint(run).name == "checkpoint-00000002"
    import controlnet.training.checkpoints as ts

    real = ts.save_safetensors

    def dying(tensors, path, *a, **kw):
        if str(path).endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ts, "save_safetensors", dying)
    with pytest.raises(OSError, match="disk full"):
        train(config(tmp_path, steps=4, checkpoint_every=2, resume=True), obj, Circles(8))
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-00000002"]
    assert latest_checkpoint(run).name == "checkpoint-00000002"


def test_a_fresh_run_never_mixes_with_an_earlier_one_in_its_folder(tmp_path):
    run = tmp_path / "run"
    _, obj = setup()
    train(config(tmp_path, steps=4, checkpoint_every=2), obj, Circles(8))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    _, again = setup()
    with pytest.raises(ValueError, match=r"holds an earlier training run .*--resume.*--overwrite.*--out"):
        train(config(tmp_path, steps=2, checkpoint_every=2), again, Circles(8))
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing touched
    # overwrite removes the earlier run: its step-4 checkpoint and its metrics beyond step 2 go
    train(config(tmp_path, steps=2, checkpoint_every=2, overwrite=True), again, Circles(8))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000002"]
    assert [r[0] for r in loss_rows(run)] == ["1", "2"]
    # a folder with other files (not a run) is no earlier run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    train(config(tmp_path, "other", steps=1), setup()[1], Circles(8))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("damage", ["truncate", "pickle"])
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, damage):
    _, obj = setup()
    train(config(tmp_path, steps=2, checkpoint_every=2), obj, Circles(8))
    opt = tmp_path / "run" / "checkpoint-00000002" / "optimizer.safetensors"
    if damage == "truncate":
        opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    else:
        torch.save({"state": {}}, opt)
    with pytest.raises(ValueError, match=r"checkpoint-00000002: corrupt checkpoint"):
        train(config(tmp_path, steps=4, checkpoint_every=2, resume=True), obj, Circles(8))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"steps": None}, "exactly one of steps and epochs"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be"),
        ({"batch_size": 32}, "the training set has 8 items, fewer than one optimizer step's 32"),
        ({"lr": 0.0}, "learning rates must be > 0"),
        ({"compile_mode": "max-autotune"}, "compile_mode must be one of default, reduce-overhead"),
    ],
)
def test_bad_configs(tmp_path, kw, message):
    _, obj = setup()
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path, **kw), obj, Circles(8))


def test_bad_empty_prompt_probability():
    base = make_base()
    with pytest.raises(ValueError, match=r"empty-prompt probability must be in \[0, 1\]"):
        ControlNetObjective(base, make_controlnet(base.unet), empty_prompt_prob=1.5)


def test_base_model_stages_train_their_parts_only(tmp_path):
    from controlnet.training.objectives import BaseObjective, VaeObjective

    base = make_base()
    frozen = {"unet": digest(base.unet), "text_encoder": digest(base.text_encoder)}
    vae_before = digest(base.vae)
    data = Circles(16)
    obj = VaeObjective(base)
    before = fixed_loss(obj, data)
    train(config(tmp_path, "vae", steps=6, lr=3e-3), obj, data)
    assert digest(base.vae) != vae_before and fixed_loss(obj, data) < before
    assert {"unet": digest(base.unet), "text_encoder": digest(base.text_encoder)} == frozen

    vae_after = digest(base.vae)
    obj = BaseObjective(base)
    train(config(tmp_path, "base", steps=2, lr=1e-3), obj, data)
    assert digest(base.vae) == vae_after
    assert digest(base.unet) != frozen["unet"] and digest(base.text_encoder) != frozen["text_encoder"]


@pytest.mark.parametrize("stage", ["controlnet", "vae", "base"])
def test_networks_are_what_a_step_runs(stage):
    """``networks()`` (what --compile compiles) are modules whose forward runs in every step: a
    network the step reaches through other methods (a VAE's encode and decode) would be compiled
    for nothing."""
    from controlnet.training.objectives import BaseObjective, VaeObjective

    base, obj = setup()
    obj = {"controlnet": obj, "vae": VaeObjective(base), "base": BaseObjective(base)}[stage]
    ran: set[int] = set()
    hooks = [n.register_forward_hook(lambda m, a, o: ran.add(id(m))) for n in obj.networks()]
    fixed_loss(obj, Circles(8))
    for h in hooks:
        h.remove()
    assert obj.networks() and ran == {id(n) for n in obj.networks()}


@pytest.mark.parametrize("precision", ["no", "bf16"])  # bf16: a float32 ControlNet beside a bf16 base
def test_validation_writes_grids_scores_and_the_convergence_step(tmp_path, precision):
    from controlnet.training.validation import ControlValidator

    calls = []

    def scorer(images, items):
        calls.append(len(images))
        assert images[0].shape == (64, 64, 3) and images[0].dtype.name == "uint8"
        return {"fake": 0.2 * len(calls)}  # rises 0.2, 0.4, 0.6: crosses 0.5 at the third validation

    _, obj = setup()
    data = Circles(12)
    val = ControlValidator(data, 2, scorer=scorer, steps=2)
    cfg = config(
        tmp_path,
        steps=6,
        validate_every=2,
        validation_count=2,
        score_name="fake",
        score_threshold=0.5,
        mixed_precision=precision,
    )
    result = train(cfg, obj, data, validator=val)
    run = tmp_path / "run"
    assert calls == [2, 2, 2] and result.converged_at == 6
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step-0000000{i}.png" for i in (2, 4, 6)]
    assert (run / "scores.png").is_file()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows} >= {"loss", "val_loss", "score/fake"}


def _spoil_sample(monkeypatch, index: int, value: float):
    """Make validation's sampler return sample ``index`` filled with ``value``; returns the real one."""
    import controlnet.training.validation as validation

    real = validation.render

    def broken(*args, **kw):
        out = real(*args, **kw)
        out.latents[index] = value
        return out

    monkeypatch.setattr(validation, "render", broken)
    return real


def test_validation_warns_of_samples_that_are_not_finite(tmp_path, monkeypatch):
    """A sample that came out NaN is named, not only drawn black."""
    import controlnet.training.validation as validation

    real = _spoil_sample(monkeypatch, 0, float("nan"))
    _, obj = setup()
    val = validation.ControlValidator(Circles(12), 2, steps=2)
    with pytest.warns(RuntimeWarning, match="step 5: 1 of 2 samples are not finite"):
        val(obj, 5, tmp_path)
    assert (tmp_path / "samples" / "step-00000005.png").is_file()
    monkeypatch.setattr(validation, "render", real)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        val(obj, 6, tmp_path)  # finite samples: no warning


def test_base_model_validation_reconstructs_or_samples_and_restores_training_mode(tmp_path, monkeypatch):
    """The VAE stage is scored by reconstruction PSNR, the base stage by samples from the held-out
    prompts alone; both draw a grid, hand the networks back in training mode, and name samples that
    are not finite."""
    import controlnet.training.validation as validation
    from controlnet.training.objectives import BaseObjective, VaeObjective

    base, data = make_base(), Circles(6)
    val = validation.ImageValidator(data, 2, steps=2)
    vae = VaeObjective(base)
    scores = val(vae, 3, tmp_path / "vae")
    assert set(scores) == {"score/psnr_db"} and 0 < scores["score/psnr_db"] < 100
    assert (tmp_path / "vae" / "samples" / "step-00000003.png").is_file() and base.vae.training

    obj = BaseObjective(base)
    assert val(obj, 4, tmp_path / "base") == {}  # "circle 0" is not a fill50k prompt: no colour score
    assert (tmp_path / "base" / "samples" / "step-00000004.png").is_file()
    assert obj.network.training and obj.text_encoder.training

    _spoil_sample(monkeypatch, 1, float("inf"))
    with pytest.warns(RuntimeWarning, match="step 5: 1 of 2 samples are not finite"):
        val(obj, 5, tmp_path / "base")


def test_lr_schedule_warms_up_then_decays_to_zero_on_a_cosine():
    from controlnet.training.train import lr_factor

    cfg = TrainConfig(out="unused", steps=110, warmup_steps=10, lr_schedule="cosine")
    warm = [lr_factor(cfg, s, 110) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_factor(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 110) == pytest.approx(0.5)
    decay = [lr_factor(cfg, s, 110) for s in range(10, 110)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert decay[-1] < 1e-3
    constant = TrainConfig(out="unused", steps=110, warmup_steps=10)
    assert lr_factor(constant, 100, 110) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(out="unused", steps=1, lr_schedule="linear").validate()


def test_noise_offset_shifts_each_image_channel_by_a_constant():
    """Offset noise adds one draw per (image, channel): the channel means of the regression target
    spread by about the offset (plain noise: 1/sqrt(pixels)), while within a channel the noise
    keeps unit variance; the noisy latents are the schedule's mix of latents and that target."""
    base = make_base()
    latents = torch.randn(64, 4, 8, 8)
    spreads = {}
    for offset in (0.0, 0.5):
        inputs = ControlNetObjective(base, make_controlnet(base.unet), noise_offset=offset).inputs
        noisy, t, target = inputs.noised(latents, StepNoise(3, 0, 0, 64, slice(0, 64), "cpu"))
        spreads[offset] = target.mean(dim=(2, 3)).std().item()
        centred = target - target.mean(dim=(2, 3), keepdim=True)
        assert abs(centred.std().item() - 1.0) < 0.05
        torch.testing.assert_close(noisy, inputs.scheduler.add_noise(latents, target, t))
    assert spreads[0.0] < 0.2 < 0.4 < spreads[0.5] < 0.6
    with pytest.raises(ValueError, match="noise offset"):
        ControlNetObjective(base, make_controlnet(base.unet), noise_offset=-0.1)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lr": float("nan")}, "learning rates must be > 0, got lr=nan"),
        ({"lr": float("inf")}, "lr must be a finite number, got inf"),
        ({"decoder_lr": float("nan")}, "learning rates must be > 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be a finite number"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"ema_decay": 1.5}, "ema_decay must be in (0, 1)"),
    ],
)
def test_settings_that_are_not_finite_numbers_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=None) as e:
        config(tmp_path, **kw).validate()
    assert message in str(e.value)


@pytest.mark.parametrize("log_every", [1, 100])  # caught by the logged loss, or at the checkpoint
def test_a_run_whose_loss_turns_nan_stops_and_keeps_its_good_checkpoint(tmp_path, monkeypatch, log_every):
    from controlnet.training.train import TrainingDiverged

    _, obj = setup()
    real, calls = type(obj).forward, []

    def turning(self, batch, noise):  # one call per step: from the fourth step on, a loss of NaN
        calls.append(1)
        loss = real(self, batch, noise)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(type(obj), "forward", turning)
    cfg = config(tmp_path, steps=8, checkpoint_every=2, log_every=log_every)
    with pytest.raises(TrainingDiverged, match=r"step 4: the (loss|weights) (is|are) not finite") as e:
        train(cfg, obj, Circles(40))
    assert "checkpoint-00000002" in str(e.value)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000002"]
    kept = load_checkpoint(latest_checkpoint(run))
    assert kept.state.step == 2 and all(torch.isfinite(t).all() for t in kept.trainable.values())
    assert not (run / "final").exists()


class Killed(BaseException):
    """The process's death, as kill -9: raised at one file operation and at every one after it,
    so no clean-up writes, renames or deletes anything either."""


def _killed_at(monkeypatch, kill_at):
    """Count the operations that write, rename or delete files (checkpoint writes included) and
    die at the ``kill_at``-th (-1: never); returns the counter."""
    import controlnet.training.checkpoints as checkpoints

    done = [0]

    def counted(fn):
        def op(*args, **kw):
            if kill_at != -1 and done[0] >= kill_at:
                done[0] += 1
                raise Killed
            done[0] += 1
            return fn(*args, **kw)

        return op

    for owner, name in [
        (os, "replace"),
        (os, "rename"),
        (os, "fsync"),
        (os, "unlink"),  # what shutil.rmtree calls, file by file: a deletion can stop half-way
        (os, "rmdir"),
        (Path, "write_text"),
        (checkpoints, "save_safetensors"),
    ]:
        monkeypatch.setattr(owner, name, counted(getattr(owner, name)))
    return done


def test_a_run_killed_at_any_point_leaves_every_checkpoint_whole(tmp_path, monkeypatch):
    """A run killed at random points among its file operations (checkpoint writes and deletions
    included): `latest` and every listed checkpoint load, and a resume ends the run where an
    uninterrupted one ends."""
    import random

    def run(name, kill_at, resume=False):
        with monkeypatch.context() as m:
            done = _killed_at(m, kill_at)
            _, obj = setup()
            cfg = config(tmp_path, name, steps=4, batch_size=2, checkpoint_every=1, keep_checkpoints=2)
            cfg.resume = resume
            try:
                train(cfg, obj, Circles(8))
            except Killed:
                return None
            return done[0]

    ops = run("whole", -1)
    expected = load_file(str(latest_checkpoint(tmp_path / "whole") / "trainable.safetensors"))
    seed = random.randrange(2**32)
    for k in sorted(random.Random(seed).sample(range(ops), 6)):
        name = f"killed-{k}"
        assert run(name, k) is None, (seed, k)
        listed = sorted((tmp_path / name).glob("checkpoint-*"))
        for c in listed:
            load_checkpoint(c)  # whole, or not listed
        latest = latest_checkpoint(tmp_path / name)
        assert (latest is None) == (listed == []), (seed, k)
        run(name, -1, resume=True)  # (with no checkpoint yet: from the start)
        got = load_file(str(latest_checkpoint(tmp_path / name) / "trainable.safetensors"))
        assert all(torch.equal(got[n], expected[n]) for n in expected), (seed, k)
