"""ChannelsLastGroupNorm: the same normalisation as nn.GroupNorm, computed in the input's layout."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from controlnet.model.channels_last_norm import ChannelsLastGroupNorm, use_channels_last_group_norm
from controlnet.model.fastpath import compile_modules


def pair(groups: int = 4, channels: int = 16) -> tuple[nn.GroupNorm, ChannelsLastGroupNorm]:
    torch.manual_seed(0)
    ref = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = ChannelsLastGroupNorm(groups, channels)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def channels_last_input(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape) * 3 + 1  # a mean and scale far from 0 and 1: the statistics matter
    return x.to(memory_format=torch.channels_last).requires_grad_()


def test_forward_and_gradients_match_group_norm_and_keep_channels_last():
    ref, ours = pair()
    x = channels_last_input(2, 16, 5, 7)
    y_ref, y = ref(x), ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    g = torch.randn_like(y_ref)
    seen = []
    h = x * 1  # a non-leaf input, so the hook sees the gradient as the norm's backward returns it
    h.register_hook(lambda grad: seen.append(grad.is_contiguous(memory_format=torch.channels_last)))
    grads = torch.autograd.grad(ours(h), [x, ours.weight, ours.bias], g)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight, ref.bias], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert seen == [True]


def test_dtype_under_autocast_and_in_low_precision_matches_group_norm():
    ref, ours = pair()
    x = channels_last_input(2, 16, 4, 4).detach()
    with torch.autocast("cpu", torch.bfloat16):
        y_ref, y = ref(x), ours(x)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0.05)
    ref16, ours16 = copy.deepcopy(ref).bfloat16(), copy.deepcopy(ours).bfloat16()
    xb = x.bfloat16()
    assert ours16(xb).dtype == torch.bfloat16
    torch.testing.assert_close(ours16(xb).float(), ref16(xb).float(), rtol=0, atol=0.05)


def test_other_layouts_and_shapes_take_group_norm_itself():
    ref, ours = pair()
    nchw = torch.randn(2, 16, 5, 7)
    assert torch.equal(ours(nchw), ref(nchw))
    flat = torch.randn(3, 16, 10)  # 3-D input
    assert torch.equal(ours(flat), ref(flat))


def test_switching_keeps_parameters_names_and_other_modules():
    class MyNorm(nn.GroupNorm):  # a subclass has its own forward: left alone
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), MyNorm(2, 8), nn.GroupNorm(4, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_channels_last_group_norm(model) == 2
    switched = [nn.Conv2d, ChannelsLastGroupNorm, nn.SiLU, MyNorm, ChannelsLastGroupNorm]
    assert [type(m) for m in model] == switched
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert use_channels_last_group_norm(model) == 0  # already switched


@pytest.mark.parametrize("training", [False, True])
def test_compile_modules_switches_group_norms_for_training_only(training):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8))
    compile_modules([model], training=training)
    assert isinstance(model[1], ChannelsLastGroupNorm) is training
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_traces_as_one_graph_and_matches_eager():
    """torch.compile must see the whole norm (autocast queries included) as one graph."""
    torch._dynamo.reset()
    ref, ours = pair()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True, dynamic=False)
    x = channels_last_input(2, 16, 6, 6)
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y, y_ref = compiled(x), ref(x)
        assert y.dtype == y_ref.dtype
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=0.05 if autocast else 1e-5)
    (gx,) = torch.autograd.grad(compiled(x).sum(), [x])
    (gx_ref,) = torch.autograd.grad(F.group_norm(x, 4, ref.weight, ref.bias, ref.eps).sum(), [x])
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-4)
