"""Run by test_train.py under torchrun: a tiny ControlNet training on N CPU processes, of a UNet
base or of a Flux.1 (flow-matching transformer) base; ``unet-stop``: the UNet run, in which the
last process alone is sent SIGTERM during its second step; ``flux-fsdp STEPS [resume] [accum]
[compile] [bf16]`` (or ``unet-fsdp``): the run with its weights sharded by accelerate's FSDP2 (EMA,
validation on every process, checkpoints and the export; ``accum``: with the ``ACCUM`` settings;
``compile``: with --compile, which the suite leaves out: a minute on two CPU cores; ``bf16``: the
frozen weights in bfloat16 under autocast, as on GPUs), each process writing what it held of the
weights and which modules were units to ``rank{N}.json``."""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from safetensors.torch import save_file

from circles import Circles
from controlnet.training.objectives import ControlNetObjective
from controlnet.training.train import TrainConfig, TrainingStopped, train
from tiny import make_base, make_controlnet


def objective_for(family: str) -> ControlNetObjective:
    """The same starting point in every process (and in the one-process run it is compared with)."""
    torch.manual_seed(0)
    if family == "flux":
        from tiny_flux import tiny_flux_base

        base = tiny_flux_base()
        return ControlNetObjective(base, base.new_controlnet({"num_layers": 1, "num_single_layers": 1}))
    base = make_base()
    return ControlNetObjective(base, make_controlnet(base.unet), empty_prompt_prob=0.5)


class SignalledCircles(Circles):
    """Circles that send this process SIGTERM when item number ``at`` (counted in this process) is read."""

    def __init__(self, n: int, at: int) -> None:
        super().__init__(n)
        self.reads, self.at = 0, at

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(i)


def fsdp_accelerator(mixed_precision: str = "no"):
    """An accelerator that shards as an FSDP2 accelerate config does on GPUs. accelerate sets
    that up on GPUs only (on CPUs its FSDP config falls back to data parallel), so this sets its
    state as the config would; the sharding itself is accelerate's own code."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accel = Accelerator(cpu=True, mixed_precision=mixed_precision)
    accel.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap"
    )
    for state in (PartialState, AcceleratorState):
        state._shared_state["distributed_type"] = DistributedType.FSDP
    return accel


#: how validation samples each family
SAMPLERS = {"flux": "euler", "unet": "ddim"}


#: the ``accum`` variant's settings: recomputed activations, two micro-batches a step, clipping
ACCUM = {"gradient_checkpointing": True, "grad_accum": 2, "max_grad_norm": 1.0}


def train_sharded(out: Path, batch: int, family: str, steps: int, flags: list[str]) -> None:
    from torch.distributed.tensor import DTensor

    from controlnet.formats import save_controlnet
    from controlnet.training.validation import ControlValidator

    objective = objective_for(family)
    cfg = TrainConfig(
        out=str(out),
        steps=steps,
        batch_size=batch,
        lr=1e-3,
        cpu=True,
        progress=False,
        checkpoint_every=2,
        log_every=1,
        ema_decay=0.9,
        validate_every=2,
        validation_count=2,
        resume="resume" in flags,
        compile="compile" in flags,
        mixed_precision="bfloat16" if "bf16" in flags else "float32",
        **(ACCUM if "accum" in flags else {}),
    )
    data = Circles(18)  # (the last 2 are held out for validation)

    def export(o, ema, final):
        final.mkdir(exist_ok=True)
        return save_controlnet(o.controlnet, final / "controlnet.safetensors", "controlnet", overwrite=True)

    validator = ControlValidator(data, 2, steps=2, sampler=SAMPLERS[family], guidance=1.0)
    accel = fsdp_accelerator("bf16" if "bf16" in flags else "no")
    train(cfg, objective, data, validator=validator, exporter=export, accelerator=accel)
    from torch.distributed.fsdp import FSDPModule

    held = {
        n: [p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel()]
        for n, p in objective.controlnet.named_parameters()
    }
    blocks = [n for n, m in objective.named_modules() if type(m).__name__ in objective._no_split_modules]
    units = [n for n, m in objective.named_modules() if isinstance(m, FSDPModule)]
    report = {"held": held, "blocks": blocks, "units": units}
    (out / f"rank{accel.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    out, batch, family = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if family.endswith("-fsdp"):
        train_sharded(out, batch, family.removesuffix("-fsdp"), int(sys.argv[4]), sys.argv[5:])
        sys.exit(0)
    rank = int(os.environ.get("RANK", "0"))
    stop = family == "unet-stop"
    objective = objective_for("unet" if stop else family)
    cfg = TrainConfig(
        out=str(out),
        steps=4 if stop else 3,
        batch_size=batch,
        lr=1e-3,
        cpu=True,
        progress=False,
        checkpoint_every=100,
        log_every=2 if stop else 1,
    )
    if stop:
        data = SignalledCircles(16, batch + 1 if rank == 1 else 0)  # rank 1, in step 2
        try:
            train(cfg, objective, data)
        except TrainingStopped as e:
            (out / f"rank{rank}.stopped").write_text(str(e))
        sys.exit(0)
    train(cfg, objective, Circles(16))
    save_file(
        {k: v.contiguous() for k, v in objective.trainable_state().items()},
        str(out / f"rank{rank}.safetensors"),
    )
