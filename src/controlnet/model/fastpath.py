"""Speed: CUDA graphs for the per-step model call, and compilation for the fast path.

A denoising step launches a thousand or more small kernels (UNet + ControlNets); at batch 1 the
GPU spends more time waiting for Python to launch them than computing. :class:`GraphCache`
records the step's kernels once as a CUDA graph per distinct set of active controls and replays
them, which removes the launch overhead without changing a single operation; :func:`step_graphs`
keeps the graphs on the UNet, so that later generations replay them too instead of paying for a
capture. ``compile_modules`` (the ``--fast`` flag) additionally lets torch.compile fuse the
elementwise work; its first call compiles (a minute or more), later calls are fast.
:func:`run_concurrently` runs independent work (the UNet's encoder and the ControlNets of one
step) on parallel CUDA streams.

On a CPU the cache runs the same function on its static buffers without a graph, so the buffer
plumbing is the code that the GPU path uses, and is tested.
"""

from __future__ import annotations

import itertools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .channels_last_norm import use_channels_last_group_norm

__all__ = [
    "COMPILE_MODES",
    "GraphCache",
    "check_compile_mode",
    "compile_modules",
    "has_own_graphs",
    "release_graphs",
    "run_concurrently",
    "step_graphs",
    "weights_key",
]

#: torch.compile modes offered: "default" fuses kernels; "reduce-overhead" also replays them from
#: inductor's CUDA graphs (for training steps, which GraphCache does not capture)
COMPILE_MODES = ("default", "reduce-overhead")

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]

#: side streams per CUDA device, created on first use and reused (also inside graph captures)
_SIDE_STREAMS: dict[int, list[torch.cuda.Stream]] = {}


class GraphCache:
    """Run ``fn(static_inputs)`` through one captured CUDA graph per ``key`` and input layout.

    ``fn`` must read everything that varies from the dict it is given (the static buffers): the
    entry is kept and replayed for later calls with the same key and input shapes, also in later
    generations, so the key must name whatever else ``fn`` depends on (its modules' weights, its
    Python constants). Least recently used entries beyond ``max_entries`` are dropped. The
    returned tensor is a copy, so callers may keep it across steps.
    """

    def __init__(self, device: torch.device, *, warmup: int = 2, max_entries: int = 8) -> None:
        self.device = device
        self.use_graphs = device.type == "cuda"
        self.warmup = warmup
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, tuple[Any, dict[str, torch.Tensor], torch.Tensor | None]]
        self.entries = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.captures = 0

    def run(self, key: Hashable, fn: StepFn, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # an input kept on the CPU is host data that steers the step's Python code (lengths, not
        # values it computes with): a graph captured for some values would replay them for others
        host = tuple(
            (name, tuple(t.flatten().tolist())) for name, t in inputs.items() if t.device.type == "cpu"
        )
        key = (
            key,
            tuple((name, t.shape, t.dtype) for name, t in inputs.items()),
            host if self.use_graphs else (),
        )
        entry = self.entries.get(key)
        if entry is None:
            statics = {name: t.detach().clone() for name, t in inputs.items()}
            graph, out = self._capture_or_not(fn, statics) if self.use_graphs else (None, None)
            self.entries[key] = entry = (graph, statics, out)
            self.captures += 1
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        graph, statics, out = entry  # (not the function: it would keep its caller's tensors alive)
        for name, t in inputs.items():
            statics[name].copy_(t)
        if graph is None:  # CPU, or no room for a graph: this call's function on the static buffers
            return fn(statics).clone()
        graph.replay()
        assert out is not None
        return out.clone()

    def _capture_or_not(
        self, fn: StepFn, statics: dict[str, torch.Tensor]
    ) -> tuple[Any, torch.Tensor | None]:
        """A graph of ``fn``, or - when the card has no room for one (a graph's memory is a pool of
        its own, beside what the step runs in) - none, with a warning, and no graph captured on
        this cache afterwards: the steps run as they are, slower but the same."""
        try:
            return self._capture(fn, statics)
        except RuntimeError as e:  # OutOfMemoryError, or the capture's end failing after one
            if not _out_of_memory(e):
                raise
        # outside the handler: the failed capture's tensors, held by its traceback, are free now
        self.use_graphs, self.entries, self.pool = False, OrderedDict(), None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(
            "the GPU has no room for the denoising step's CUDA graph: running the steps without one "
            "(slower, the same results)",
            stacklevel=3,
        )
        return None, None

    def _capture(self, fn: StepFn, statics: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs (allocator, cuDNN/cuBLAS handles, autotuning)
            for _ in range(self.warmup):
                fn(statics)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local capture: a data loader's pin-memory thread (training validates while its
        # loader is alive) may allocate pinned memory meanwhile, which would invalidate a global one
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn(statics)
        return graph, out


def _out_of_memory(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from or during, is an out-of-memory error."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, torch.OutOfMemoryError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def step_graphs(owner: nn.Module, device: torch.device) -> GraphCache:
    """The :class:`GraphCache` kept on ``owner`` (the locked UNet) for its denoising steps, so that
    later generations replay the graphs of earlier ones instead of capturing their own (a capture
    costs several steps' time). Its memory lives as long as ``owner`` or until
    :func:`release_graphs`."""
    cache = owner.__dict__.get("_controlnet_graphs")
    if cache is None or cache.device != device:
        cache = owner.__dict__["_controlnet_graphs"] = GraphCache(device)
    return cache


def release_graphs(owner: nn.Module) -> None:
    """Drop the graphs :func:`step_graphs` keeps on ``owner`` (and the GPU memory they hold)."""
    owner.__dict__.pop("_controlnet_graphs", None)


def weights_key(modules: Iterable[nn.Module]) -> tuple[int, ...]:
    """Where the modules' parameters and buffers live: a captured graph reads them from these
    addresses, so it may be replayed only while they are unchanged (updates in place keep them)."""
    return tuple(t.data_ptr() for m in modules for t in itertools.chain(m.parameters(), m.buffers()))


def check_compile_mode(mode: str, what: str = "compile mode") -> None:
    """A ValueError naming ``what`` unless ``mode`` is one of :data:`COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{what} must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def compile_modules(
    modules: Iterable[nn.Module],
    mode: str = "default",
    *,
    training: bool = False,
    regions: tuple[type[nn.Module], ...] = (),
) -> None:
    """Compile each module's forward in place (idempotent), in channels-last memory format, which
    the tensor-core convolution kernels prefer. In the default mode the CUDA graphs of
    :class:`GraphCache` capture the compiled kernels (inductor's own graphs are not used); it
    fuses the elementwise work and compiles SD1.5 in about a minute. "reduce-overhead" lets
    inductor replay its own CUDA graphs (training, where a step's backward runs too); torch.compile
    works on first call, so only what runs is compiled (a family compiles the parts its network
    runs in besides: :meth:`~controlnet.families.protocol.BaseModel.compile`). ``training``:
    GroupNorm layers become
    :class:`~controlnet.model.channels_last_norm.ChannelsLastGroupNorm` (fewer layout copies in the
    backward pass); generation keeps the native op, which is as fast in a forward pass.

    ``regions`` (or a module's own ``compile_regions``): block classes compiled one by one instead
    of the whole forward. A transformer repeats a few kinds of block dozens of times: each kind
    compiles once (in seconds) and every instance reuses it, where one graph of the whole network
    takes minutes and fuses nothing more."""
    check_compile_mode(mode)
    for m in modules:
        if getattr(m, "_controlnet_compiled", None):
            continue
        if training:
            use_channels_last_group_norm(m)
        m.to(memory_format=torch.channels_last)
        blocks = regions or getattr(m, "compile_regions", ())
        if blocks:
            for block in m.modules():
                if isinstance(block, blocks):
                    block.compile(mode=mode, dynamic=False)  # one compiled code for every instance
        else:
            m.forward = torch.compile(m.forward, mode=mode, dynamic=False)  # type: ignore[method-assign]
        m._controlnet_compiled = mode  # type: ignore[attr-defined]


def has_own_graphs(modules: Iterable[nn.Module]) -> bool:
    """Whether any module replays inductor's CUDA graphs (then no graph may be captured around it)."""
    return any(getattr(m, "_controlnet_compiled", None) == "reduce-overhead" for m in modules)


def run_concurrently(
    fns: Sequence[Callable[[], list[torch.Tensor]]], device: torch.device
) -> list[list[torch.Tensor]]:
    """``[fn() for fn in fns]``, on a CUDA device with each function after the first on its own
    side stream, so that independent kernels (two ControlNets at batch 2 leave much of an H100
    idle) overlap. The side streams start after the work already queued on the current stream
    and the current stream waits for all of them before anything queued later, so the caller sees
    the same order of effects as the plain loop; the kernels, and so the results, are the same.
    Works inside a CUDA graph capture (the fork and join become graph edges). Elsewhere: the
    plain loop.
    """
    if device.type != "cuda" or len(fns) < 2:
        return [fn() for fn in fns]
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = _SIDE_STREAMS.setdefault(index, [])
    while len(streams) < len(fns) - 1:
        streams.append(torch.cuda.Stream(device=index))
    main = torch.cuda.current_stream(index)
    outs: list[list[torch.Tensor]] = [[] for _ in fns]
    for i, (fn, side) in enumerate(zip(fns[1:], streams), start=1):
        side.wait_stream(main)
        with torch.cuda.stream(side):
            outs[i] = fn()
    outs[0] = fns[0]()
    for i, side in enumerate(streams[: len(fns) - 1], start=1):
        main.wait_stream(side)
        # memory made on a side stream and read on the main one must not be reused before the
        # main stream is done with it
        for t in outs[i]:
            t.record_stream(main)
    return outs
