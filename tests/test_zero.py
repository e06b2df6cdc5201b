"""The generic controlled block: y = F(x) + Z2(F_copy(x + Z1(c)))."""

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from controlnet import ControlledBlock, Layout, zero_conv, zero_linear
from controlnet.model.zero import ControlledCopy


class ConvBlock(nn.Module):
    """A conv block with an extra input (a time embedding), like a UNet ResBlock."""

    def __init__(self, cin: int, cout: int, emb: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm = nn.GroupNorm(1, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x) + self.emb(temb)[:, :, None, None]
        return self.conv2(torch.nn.functional.silu(self.norm(h)))


def conv_case(cin=5, cout=7, ccond=3, seed=0):
    torch.manual_seed(seed)
    block = ControlledBlock(ConvBlock(cin, cout), cin, ccond, cout)
    x, c, temb = torch.randn(2, cin, 9, 11), torch.randn(2, ccond, 9, 11), torch.randn(2, 6)
    return block, (x, c, temb)


def transformer_case(d=8, ccond=5, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0)
    block = ControlledBlock(layer, d, ccond, layout=Layout.TOKENS)
    x, c = torch.randn(3, 6, d), torch.randn(3, 6, ccond)
    return block, (x, c)


CASES = {"conv": conv_case, "transformer": transformer_case}


@pytest.mark.parametrize("case", CASES)
def test_zero_init_is_bitwise_identity(case):
    block, args = CASES[case]()
    block.eval()
    with torch.no_grad():
        assert torch.equal(block(*args), block.block(args[0], *args[2:]))


@given(cin=st.integers(1, 6), cout=st.integers(1, 6), ccond=st.integers(1, 6), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_identity_holds_for_any_shapes_and_conditions(cin, cout, ccond, seed):
    block, (x, c, temb) = conv_case(cin, cout, ccond, seed)
    c = c * 1e3  # large conditions change nothing either
    with torch.no_grad():
        assert torch.equal(block(x, c, temb), block.block(x, temb))


@pytest.mark.parametrize("case", CASES)
def test_copy_equals_block_and_block_is_locked(case):
    block, _ = CASES[case]()
    locked, copy = block.block.state_dict(), block.copy.state_dict()
    assert locked.keys() == copy.keys()
    for k in locked:
        assert torch.equal(locked[k], copy[k]), k
        assert locked[k].data_ptr() != copy[k].data_ptr(), f"{k} is shared, not copied"
    assert all(not p.requires_grad for p in block.block.parameters())
    assert all(p.requires_grad for p in block.copy.parameters())
    for z in (block.zero_in, block.zero_out):
        assert all(torch.count_nonzero(p) == 0 for p in z.parameters())


@pytest.mark.parametrize("case", CASES)
def test_first_backward_and_step(case):
    block, args = CASES[case]()
    block.train()
    locked_before = {k: v.clone() for k, v in block.block.state_dict().items()}
    base = block.block(args[0], *args[2:]).detach()
    block(*args).square().mean().backward()
    # The formula: dL/dW(Z2) is Z2's input (non-zero); everything behind Z2 sees zero gradient.
    assert block.zero_out.weight.grad.abs().sum() > 0
    for name, p in [*block.copy.named_parameters(), *block.zero_in.named_parameters()]:
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert all(p.grad is None for p in block.block.parameters())

    opt = torch.optim.AdamW([p for p in block.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for k, v in block.block.state_dict().items():
        assert torch.equal(v, locked_before[k]), k
    with torch.no_grad():
        assert not torch.equal(block(*args), base)


def test_zero_layers_are_zero_and_shaped():
    conv, lin = zero_conv(3, 5), zero_linear(4, 2)
    assert conv.weight.shape == (5, 3, 1, 1) and lin.weight.shape == (2, 4)
    assert conv(torch.randn(1, 3, 4, 4)).abs().sum() == 0
    assert zero_conv(2, 2, 3)(torch.randn(1, 2, 5, 5)).shape == (1, 2, 5, 5)


class _BlocksCopy(ControlledCopy):
    """A copy of the first blocks of a token network, each block's output a residual: the shape
    of a transformer ControlNet, on the same generic controlled copy as the UNet's."""

    def __init__(self, blocks: torch.nn.ModuleList, width: int, cond_width: int) -> None:
        super().__init__()
        self.blocks = copy.deepcopy(blocks).requires_grad_(True)
        self.cond_embedder = zero_linear(cond_width, width)
        self.zero_outs = torch.nn.ModuleList(zero_linear(width, width) for _ in blocks)

    def condition_layer(self):
        return self.cond_embedder

    def output_layers(self):
        return list(self.zero_outs)

    def copy_forward(self, h):
        outs = []
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return outs


def test_the_generic_copy_wraps_transformer_blocks_and_starts_from_the_base():
    """The formula's multi-output form around transformer blocks: at initialisation every residual
    is exactly zero, so a base that adds residual i to its block i's output is unchanged; one step
    opens the connections while the base stays locked."""
    torch.manual_seed(0)
    width = 16
    base = torch.nn.ModuleList(
        torch.nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True) for _ in range(3)
    ).requires_grad_(False)
    control = _BlocksCopy(base[:2], width, cond_width=5)
    x, c = torch.randn(2, 7, width), torch.randn(2, 7, 5)

    def run(residuals):
        h = x
        for i, block in enumerate(base):
            h = block(h)
            if i < len(residuals):
                h = h + residuals[i]
        return h

    residuals = control.residuals(x, control.embed_condition(c))
    assert all(torch.equal(r, torch.zeros_like(r)) for r in residuals)
    assert torch.equal(run(residuals), run([]))
    run(control.residuals(x, control.embed_condition(c))).square().mean().backward()
    assert all(z.weight.grad is not None and z.weight.grad.abs().sum() > 0 for z in control.zero_outs)
    assert all(p.grad is None for p in base.parameters())


def test_the_unet_controlnet_runs_the_generic_formula(monkeypatch):
    """The production ControlNet computes its residuals through ControlledCopy.residuals."""
    from controlnet.families.sd.configs import Family
    from tiny import cond_image, make_controlnet, make_unet, unet_inputs

    unet = make_unet(Family.SD1)
    cn = make_controlnet(unet, open_zero=True)
    calls = []
    real = ControlledCopy.residuals

    def spy(self, x, condition, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, x, condition, *args, **kwargs)

    monkeypatch.setattr(ControlledCopy, "residuals", spy)
    inputs = unet_inputs(unet)
    out = cn(
        inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], cn.encode_hint(cond_image())
    )
    assert calls == ["ControlNet"] and len(out) == cn.num_residuals
    assert isinstance(cn, ControlledCopy) and cn.zero_convs()[1:] == cn.output_layers()
