"""Run by test_train.py under torchrun: a tiny ControlNet training on N CPU processes, of a UNet
base or of a Flux.1 (flow-matching transformer) base; ``unet-stop``: the UNet run, in which the
last process alone is sent SIGTERM during its second step."""

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


if __name__ == "__main__":
    out, batch, family = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
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
