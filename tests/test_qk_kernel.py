"""The hand-written query/key kernel computes what the compiled group computes: each stream's RMS
norm, the streams joined, the rotary embedding, tokens-major output - run here by Triton's CPU
interpreter (float32 to rounding; the interpreter's bf16 stores truncate where the GPU's round)."""

from __future__ import annotations

import pytest
import torch

from controlnet.model import fused, qk_kernel


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel module, run on the CPU by Triton's interpreter (conftest sets it up)."""
    import os

    assert os.environ.get("TRITON_INTERPRET") == "1" and qk_kernel.triton is not None
    monkeypatch.setattr(qk_kernel, "ON_CPU", True)
    return qk_kernel


def streams(batch, lengths, heads, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = tuple(
        torch.randn(batch, n, heads * d, generator=g).to(dtype).unflatten(-1, (heads, d)) for n in lengths
    )
    weights = tuple(1 + 0.3 * torch.randn(d, generator=g) for _ in lengths)
    angles = torch.rand(sum(lengths), d // 2, generator=g) * 6.28
    cos, sin = (f(angles).repeat_interleave(2, -1) for f in (torch.cos, torch.sin))
    return parts, weights, cos, sin


@pytest.mark.parametrize(
    "case",
    [
        "two streams",
        "one stream",
        "three streams",
        "no norm",
        "no rotary",
        "positions per sample",
        "strided stream",
    ],
)
def test_the_kernel_equals_the_compiled_group(interpreted, case):
    parts, weights, cos, sin = streams(2, (5, 7), 3, 16)
    if case == "one stream":
        parts, weights, cos, sin = parts[1:], weights[1:], cos[5:], sin[5:]
    if case == "three streams":  # one launch for the first two, one for the third
        parts, weights, cos, sin = streams(2, (5, 7, 4), 3, 16)
    if case == "no norm":
        weights = None
    if case == "no rotary":
        cos = sin = None
    if case == "positions per sample":  # (B, L, D): each sample its own table
        cos, sin = torch.stack([cos, cos.flip(0)]), torch.stack([sin, sin.flip(0)])
    if case == "strided stream":  # a view of a wider projection (the heads' stride is not D)
        wide = torch.randn(2, 7, 3, 32)
        parts = (parts[0], wide[..., :16])
    call = (parts, weights, 1e-6, cos, sin)
    assert interpreted.usable(parts, (*(weights or ()), *(t for t in (cos, sin) if t is not None)))
    got, want = interpreted.qk_rms_rotary(*call), fused._queries(*call)
    assert got.shape == want.shape == (2, 3, sum(p.shape[1] for p in parts), 16)
    assert got.stride() == want.stride()  # the same tokens-major memory under the (B, H, L, D) view
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


def test_bf16_streams_round_once(interpreted):
    """bf16 in and out: the float32 result rounded once (here truncated: the interpreter's store)."""
    parts, weights, cos, sin = streams(1, (4, 9), 2, 32, torch.bfloat16, seed=3)
    got = interpreted.qk_rms_rotary(parts, weights, 1e-6, cos, sin)
    exact = fused._queries(tuple(p.float() for p in parts), weights, 1e-6, cos, sin).contiguous()
    truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(
        got.float(), truncated.transpose(1, 2).contiguous().transpose(1, 2), rtol=0, atol=1e-6
    )


def test_queries_use_the_kernel_only_where_it_applies(interpreted, monkeypatch):
    """fused.queries takes the kernel for inference where it runs, the compiled group where
    gradients are kept; a kernel that fails once gives way to the group, with a warning."""
    monkeypatch.setattr(fused, "_QK_KERNEL", {})
    parts, weights, cos, sin = streams(1, (3, 4), 2, 8)
    calls = []
    real = interpreted.qk_rms_rotary
    monkeypatch.setattr(interpreted, "qk_rms_rotary", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused.queries(parts, weights, 1e-6, cos, sin)
    assert calls == [1] and fused.kernel_state()["queries (kernel)"] == "triton"
    trained = tuple(w.clone().requires_grad_() for w in weights)
    out = fused.queries(parts, trained, 1e-6, cos, sin)
    assert calls == [1] and out.requires_grad  # the group, whose backward exists
    assert not interpreted.usable((torch.randn(1, 3, 2, 12),), ())  # a head size not a power of two

    def broken(*a):
        raise RuntimeError("no tl.join here")

    monkeypatch.setattr(interpreted, "qk_rms_rotary", broken)
    with torch.no_grad(), pytest.warns(UserWarning, match="query/key kernel is unavailable: RuntimeError"):
        got = fused.queries(parts, weights, 1e-6, cos, sin)
    torch.testing.assert_close(got, fused._queries(parts, weights, 1e-6, cos, sin))
    assert fused.kernel_state()["queries (kernel)"] == "unfused"


def test_a_block_compiled_whole_calls_the_kernel_as_an_operator(interpreted, monkeypatch):
    """Inside a region compiled whole (``--fast``), once the kernel has run in this process, the
    compiled code calls it as one operator, with the eager result; before that, the group."""
    monkeypatch.setattr(fused, "_QK_KERNEL", {})
    parts, weights, cos, sin = streams(1, (3, 5), 2, 8)
    launches = []
    real = interpreted._launch
    monkeypatch.setattr(interpreted, "_launch", lambda *a: launches.append(1) or real(*a))

    def attention_input(*parts):
        return fused.queries(parts, weights, 1e-6, cos, sin) * 2

    with torch.no_grad():
        torch._dynamo.reset()
        before = torch.compile(attention_input, backend="aot_eager", fullgraph=True)(*parts)
        assert launches == []  # not yet proved here: the group, traced
        fused.try_qk_kernel("cpu")
        assert fused.kernel_state()["queries (kernel)"] == "triton" and launches == [1]
        torch._dynamo.reset()
        after = torch.compile(attention_input, backend="aot_eager", fullgraph=True)(*parts)
    assert len(launches) == 2  # the operator, called by the compiled code
    want = fused._queries(parts, weights, 1e-6, cos, sin) * 2
    torch.testing.assert_close(after, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(before, want, rtol=2e-6, atol=2e-6)
    assert after.stride() == want.stride()
