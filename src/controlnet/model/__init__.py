"""The method itself, independent of any one base model: zero layers and the controlled block of
the paper's formula, how control residuals are scaled and summed, and the fast path (compilation,
CUDA graphs, concurrent streams)."""
