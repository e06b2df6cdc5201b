"""Run by test_train.py under torchrun: a tiny ControlNet training on N CPU processes, of a UNet
base or of a Flux.1 (flow-matching transformer) base."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from safetensors.torch import save_file

from circles import Circles
from controlnet.training.objectives import ControlNetObjective
from controlnet.training.train import TrainConfig, train
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


if __name__ == "__main__":
    out, batch, family = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    objective = objective_for(family)
    cfg = TrainConfig(
        out=str(out),
        steps=3,
        batch_size=batch,
        lr=1e-3,
        cpu=True,
        progress=False,
        checkpoint_every=100,
        log_every=1,
    )
    train(cfg, objective, Circles(16))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    save_file(
        {k: v.contiguous() for k, v in objective.trainable_state().items()},
        str(out / f"rank{rank}.safetensors"),
    )
