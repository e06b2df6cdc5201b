"""Run by test_train.py under torchrun: a tiny ControlNet training on N CPU processes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from safetensors.torch import save_file

from circles import Circles
from controlnet.training.objectives import ControlNetObjective
from controlnet.training.train import TrainConfig, train
from tiny import make_base, make_controlnet

out, batch = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
base = make_base()
objective = ControlNetObjective(base, make_controlnet(base.unet), empty_prompt_prob=0.5)
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
    {k: v.contiguous() for k, v in objective.trainable_state().items()}, str(out / f"rank{rank}.safetensors")
)
