"""The elementwise work of a transformer block, fused: the groups of small kernels between a DiT
block's matrix products, each written as one function that runs as one generated kernel on a GPU.

Between its matrix products a Flux or SD3 block spends a third of its GPU time on small kernels
and copies: the adaptive layer norms' modulation, the gates and residual additions, the RMS norms
of queries and keys (computed in float32 and cast back), the rotary embedding (seven kernels and
two float32 copies per tensor), the joining of the text and image streams and the attention
layout. Here each group is one function - :func:`modulate`, :func:`gated_add`, :func:`queries`,
and for Z-Image's RMS-normed blocks :func:`rms_modulate`, :func:`gated_rms_add`, :func:`silu_gate`
- compiled alone on first use (``torch.compile`` of that function, for any shape: seconds, once)
and computing in float32 until its single rounding. Attention reads its queries, keys and values
(:func:`values`) in tokens-major memory and writes its output so, which the output projection
reads without a copy. Where a whole block is compiled
(``--fast``) they run as plain code, which inductor fuses across. The feed-forward's tanh-GELU
(:func:`linear_gelu`, :func:`feed_forward`) runs in its product's epilogue (cuBLASLt) on a GPU.

A family's fused blocks are subclasses of diffusers' blocks with the same modules and keys and a
forward built from these functions; :func:`fuse_blocks` gives a network's stock blocks that class
in place, :func:`stock_blocks` takes it back for a while (to measure or check against diffusers).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import qk_kernel

__all__ = [
    "BlockFusion",
    "adding_residuals",
    "block_residual",
    "feed_forward",
    "fuse_blocks",
    "gated_add",
    "gated_add_residual",
    "gated_rms_add",
    "kernel",
    "kernel_state",
    "last_add",
    "linear_gelu",
    "modulate",
    "plus_residual",
    "queries",
    "rms_modulate",
    "silu_gate",
    "stock_blocks",
    "stream_attention",
    "takes_residuals",
    "values",
]

Fn = TypeVar("Fn", bound=Callable[..., Any])
_COMPILED: dict[str, Callable[..., Any]] = {}
#: the devices on which the groups run compiled (elsewhere as plain code)
COMPILED_ON = {"cuda"}


def kernel(fn: Fn) -> Fn:
    """``fn`` as one generated kernel on a GPU (compiled on first use, for any shape); as it is on
    a CPU, and inside a region that is being compiled whole (which fuses it anyway). A decorator
    for any group of elementwise work (a VAE's norms too: ``families/qwenimage/frames.py``)."""

    def call(*args: Any) -> Any:
        first = args[0][0] if isinstance(args[0], tuple) else args[0]
        # plain: on a CPU; inside a region compiled whole; under a dispatch mode (a FLOP counter,
        # which torch.compile does not run under)
        if (
            first.device.type not in COMPILED_ON
            or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None
        ):
            return fn(*args)
        compiled = _COMPILED.get(fn.__name__)
        if compiled is None:
            # static shapes first; a second shape recompiles once, for any size
            compiled = _COMPILED[fn.__name__] = torch.compile(fn, fullgraph=True)
        if compiled is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # no compiler here (no Triton): the same arithmetic, unfused
            _COMPILED[fn.__name__] = fn
            warnings.warn(
                f"fused kernels unavailable, running them unfused: {type(e).__name__}: {e}", stacklevel=2
            )
            return fn(*args)

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call  # type: ignore[return-value]


def kernel_state() -> dict[str, str]:
    """How each fused group has run on a GPU so far: "compiled", or "unfused" (no compiler); and
    the query/key kernel: "triton", or "unfused" (it failed: the compiled group runs instead)."""
    state = {
        name: "compiled" if hasattr(fn, "_torchdynamo_orig_callable") else "unfused"
        for name, fn in _COMPILED.items()
    }
    if "state" in _QK_KERNEL:
        state["queries (kernel)"] = _QK_KERNEL["state"]
    return state


@kernel
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine (``eps``), then ``* (1 + scale) + shift`` per sample."""
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


@kernel
def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``, the gate per sample."""
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


@kernel
def gated_add_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``, the gate per sample, plus a ControlNet's residual ``r`` on the last
    ``r.shape[1]`` tokens (the image's, where text tokens come first): one rounding."""
    out = x.float() + gate.float()[:, None] * y.float()
    return (out + F.pad(r.float(), (0, 0, x.shape[1] - r.shape[1], 0))).to(x.dtype)


def block_residual(block: nn.Module) -> torch.Tensor | None:
    """The ControlNet residual ``block`` is to add to its image stream (:func:`adding_residuals`)."""
    return block.__dict__.get("_residual")


def last_add(block: nn.Module, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A block's last sum on its image stream, ``x + gate * y``, with the ControlNet residual
    it is given (:func:`adding_residuals`) in the same kernel."""
    r = block_residual(block)
    return gated_add(x, gate, y) if r is None else gated_add_residual(x, gate, y, r)


def plus_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` plus the residual ``block`` is given (a fused block that ran diffusers' forward)."""
    r = block_residual(block)
    return x if r is None else x + r


def takes_residuals(blocks: Iterable[nn.Module]) -> bool:
    """Whether every block adds the residual it is given (:func:`adding_residuals`) itself."""
    return all(getattr(b, "adds_residual", False) for b in blocks)


@contextmanager
def adding_residuals(blocks: Sequence[nn.Module], residuals: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Within: block j (every one :func:`takes_residuals`) adds ``residuals[j]`` to its image
    stream's output, in its last fused sum - what diffusers' transformers do after each block with
    their ``controlnet_*block_samples``, one kernel fewer per block."""
    for b, r in zip(blocks, residuals, strict=True):
        b.__dict__["_residual"] = r
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("_residual", None)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` (float32) with ``weight``: a piece of the groups below, not a kernel alone."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


@kernel
def rms_modulate(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (``weight``, ``eps``), then ``* (1 + scale)`` per sample (Z-Image's pre-norms)."""
    return (_rms(x.float(), weight, eps) * (1 + scale.float()[:, None])).to(x.dtype)


@kernel
def gated_rms_add(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x + tanh(gate) * RMSNorm(y)``, the gate per sample (Z-Image's post-norms and gates)."""
    return (x.float() + torch.tanh(gate.float())[:, None] * _rms(y.float(), weight, eps)).to(x.dtype)


@kernel
def silu_gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b``: a gated feed-forward's hidden units."""
    return (F.silu(a.float()) * b.float()).to(a.dtype)


def queries(
    parts: tuple[torch.Tensor, ...],
    weights: tuple[torch.Tensor, ...] | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    """Queries or keys of each stream, (B, L_i, H, D): each RMS-normalised with its weight (none:
    not normalised), joined along the tokens, rotated by a rotary embedding (cos, sin: (L, D), or
    (B, L, D) where each sample has its own positions; pairs interleaved; none: not rotated), as
    (B, H, L, D) for attention: a view of tokens-major memory (B, L, H, D), in which attention
    writes its output too, so that joining its heads afterwards copies nothing. On a GPU, for
    inference, one hand-written kernel (:mod:`controlnet.model.qk_kernel`; inside a block compiled
    whole, once it has run in this process: :func:`try_qk_kernel`); else one compiled group."""
    tables = (*(weights or ()), *(t for t in (cos, sin) if t is not None))
    state = _QK_KERNEL.get("state")
    if torch.compiler.is_compiling():  # a block compiled whole: the kernel once it has run here
        if state == "triton" and qk_kernel.usable(parts, tables):
            return qk_kernel.qk_rms_rotary(parts, weights, eps, cos, sin)
        return _queries(parts, weights, eps, cos, sin)
    plain = _get_current_dispatch_mode() is not None  # (a FLOP counter; it does not run compiled)
    if state != "unfused" and not plain and qk_kernel.usable(parts, tables):
        try:
            out = qk_kernel.qk_rms_rotary(parts, weights, eps, cos, sin)
            _QK_KERNEL["state"] = "triton"
            return out
        except Exception as e:  # a Triton too old for the kernel: the compiled group
            _QK_KERNEL["state"] = "unfused"
            warnings.warn(f"the query/key kernel is unavailable: {type(e).__name__}: {e}", stacklevel=2)
    return _queries(parts, weights, eps, cos, sin)


#: how the hand-written query/key kernel has run: "triton", or "unfused" once it failed
_QK_KERNEL: dict[str, str] = {}


def try_qk_kernel(device: torch.device | str) -> None:
    """Run the query/key kernel once on ``device`` (a few tokens), so that blocks compiled whole
    afterwards take it where it works, and the compiled group where it does not (with the warning
    :func:`queries` gives)."""
    device = torch.device(device)
    tokens = torch.ones(1, 2, 1, 8, device=device, dtype=torch.bfloat16)
    table = torch.ones(2, 8, device=device)
    with torch.no_grad():
        queries((tokens,), (torch.ones(8, device=device),), 1e-6, table, table)


@kernel
def _queries(
    parts: tuple[torch.Tensor, ...],
    weights: tuple[torch.Tensor, ...] | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`queries` as one compiled group (any device, gradients)."""
    out = []
    for i, x in enumerate(parts):
        out.append(x.float() if weights is None else _rms(x.float(), weights[i], eps))
    x = torch.cat(out, dim=1) if len(out) > 1 else out[0]
    if cos is not None and sin is not None:
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        x = x * cos.unsqueeze(-2).float() + rotated * sin.unsqueeze(-2).float()
    return x.to(parts[0].dtype).contiguous().transpose(1, 2)


def values(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Values of each stream, (B, L_i, H, D), joined along the tokens, as (B, H, L, D): a view of
    tokens-major memory, as :func:`queries` gives (one stream: no copy at all)."""
    x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return x.transpose(1, 2)


def stream_attention(
    attn: nn.Module, streams: list[torch.Tensor], head_dim: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Joint attention over [text, image] (each with its own projections and q/k RMS norms: the
    ``add_*`` / ``norm_added_*`` ones for the text) or over one joined stream, rotated by the
    rotary table (cos, sin: (L, D) over all tokens, pairs interleaved); output (B, L, H * D) over
    all tokens, text first (Flux's and Qwen-Image's double-stream blocks, Flux's single ones)."""

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, head_dim))

    if len(streams) == 2:
        text, image = streams
        q = (heads(attn.add_q_proj(text)), heads(attn.to_q(image)))
        k = (heads(attn.add_k_proj(text)), heads(attn.to_k(image)))
        v = (heads(attn.add_v_proj(text)), heads(attn.to_v(image)))
        qw = (attn.norm_added_q.weight, attn.norm_q.weight)
        kw = (attn.norm_added_k.weight, attn.norm_k.weight)
    else:
        (x,) = streams
        q, k, v = (heads(attn.to_q(x)),), (heads(attn.to_k(x)),), (heads(attn.to_v(x)),)
        qw, kw = (attn.norm_q.weight,), (attn.norm_k.weight,)
    out = F.scaled_dot_product_attention(
        queries(q, qw, attn.norm_q.eps, cos, sin), queries(k, kw, attn.norm_k.eps, cos, sin), values(v)
    )
    return out.transpose(1, 2).flatten(2)


def linear_gelu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``gelu(linear(x), approximate="tanh")``; on a GPU one product whose epilogue (cuBLASLt's,
    the tanh approximation) applies the GELU to the float32 sum before its single rounding. On a
    CPU (whose ``_addmm_activation`` applies the exact GELU instead), with autograd, inside a
    compiled region (inductor fuses it anyway) and for other kinds of linear layer (FP8 weights):
    the two steps."""
    if (
        x.device.type == "cuda"
        and type(linear) is nn.Linear
        and linear.bias is not None
        and linear.weight.dtype == x.dtype
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        y = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.gelu(linear(x), approximate="tanh")


def _tanh_gelu_feed_forward(ff: nn.Module) -> bool:
    """diffusers' ``FeedForward`` of a tanh-GELU, a linear layer and dropouts that do nothing."""
    from diffusers.models.activations import GELU

    net = getattr(ff, "net", None)
    if net is None or len(net) < 3:
        return False
    first, *middle = list(net)
    linears = [m for m in middle if not isinstance(m, nn.Dropout)]
    dropouts_idle = all(m.p == 0 or not m.training for m in middle if isinstance(m, nn.Dropout))
    return (
        type(first) is GELU
        and first.approximate == "tanh"
        and len(linears) == 1
        and isinstance(linears[0], nn.Linear)
        and dropouts_idle
    )


def feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ff(x)`` for a diffusers ``FeedForward``; one of a tanh-GELU runs it in the first product's
    epilogue (:func:`linear_gelu`)."""
    if not _tanh_gelu_feed_forward(ff):
        return ff(x)
    first, *rest = list(ff.net)
    h = linear_gelu(first.proj, x)
    for m in rest:
        h = m(h)
    return h


def fuse_blocks(
    network: nn.Module, fused: Mapping[type[nn.Module], type[nn.Module]], fusable: Callable[[nn.Module], bool]
) -> int:
    """Give each block of ``network`` whose class ``fused`` maps (and that is ``fusable``) the
    fused class, in place; how many."""
    n = 0
    for m in network.modules():
        kind = fused.get(type(m))
        if kind is not None and fusable(m):
            m.__class__ = kind
            n += 1
    return n


@contextmanager
def stock_blocks(network: nn.Module, fused: Mapping[type[nn.Module], type[nn.Module]]) -> Iterator[None]:
    """Within: ``network``'s fused blocks run diffusers' own forward (to measure or check against it)."""
    back = {v: k for k, v in fused.items()}
    swapped = [m for m in network.modules() if type(m) in back]
    for m in swapped:
        m.__class__ = back[type(m)]
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = fused[type(m)]


class BlockFusion:
    """A family's fused blocks: ``fused`` maps diffusers' block classes to their fused subclasses,
    ``fusable`` says which stock blocks may take them (see :func:`fuse_blocks`)."""

    def __init__(
        self, fused: Mapping[type[nn.Module], type[nn.Module]], fusable: Callable[[nn.Module], bool]
    ) -> None:
        self.fused, self.fusable = dict(fused), fusable

    def fuse(self, network: nn.Module) -> int:
        """Give each stock block of ``network`` the fused forward (in place); how many."""
        return fuse_blocks(network, self.fused, self.fusable)

    def stock(self, network: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Within: ``network``'s fused blocks run diffusers' own forward."""
        return stock_blocks(network, self.fused)
