"""Training: the loop (one for every objective, through accelerate), objectives, checkpoints,
validation during training, the ablation variants and the assembly of a run from its options."""
