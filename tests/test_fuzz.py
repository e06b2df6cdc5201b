"""Property-based tests: arbitrary JSON at sidecar replay and the API's request reading, arbitrary
bytes at every loader. Whatever arrives, the answer is a one-line ValueError (or FileNotFoundError)
naming the input, never another exception, and nothing is written."""

import functools
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controlnet.formats import load_base, load_controlnet, load_vae
from controlnet.generation.request import GenerationRequest
from controlnet.generation.sidecar import SIDECAR_FORMAT, read_sidecar

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
#: request fields, so that generated objects reach the field checks, not only the unknown-field one
FIELDS = st.sampled_from([f for f in GenerationRequest.__dataclass_fields__] + ["x"])
REQUESTS = st.dictionaries(FIELDS, JSON, max_size=6)
#: no property test may grow the process's peak memory by more than this (a reader that believed
#: a header's sizes, or a decoder of unbounded nesting, would)
CEILING_MB = 1024


@pytest.fixture(autouse=True)
def memory_ceiling():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < CEILING_MB, f"peak memory grew by {grown_mb:.0f} MB"


SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _one_line(e: BaseException) -> None:
    assert isinstance(e, (ValueError, FileNotFoundError)), repr(e)
    assert "\n" not in str(e).strip()


@SETTINGS
@given(request=REQUESTS, extra=st.dictionaries(st.sampled_from(["inputs", "outputs", "format"]), JSON))
def test_any_sidecar_is_read_or_refused_in_one_line(tmp_path, request, extra):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "s.json"
    path.write_text(json.dumps({"format": SIDECAR_FORMAT, "request": request, **extra}))
    try:
        read_sidecar(path)
    except Exception as e:
        _one_line(e)
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]


@SETTINGS
@given(request=REQUESTS)
def test_any_request_data_is_read_or_refused_in_one_line(request):
    try:
        GenerationRequest.from_dict(request)
    except Exception as e:
        _one_line(e)


def _safetensors_like(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


BYTES = st.one_of(
    st.binary(max_size=256),
    st.builds(_safetensors_like, st.binary(max_size=64), st.binary(max_size=64)),
    st.builds(
        lambda h, b: _safetensors_like(json.dumps(h).encode(), b),
        st.dictionaries(st.text(max_size=8), JSON, max_size=3),
        st.binary(max_size=32),
    ),
)


#: a header whose text holds a line break, which safetensors' error message quotes (found here)
QUOTED_BREAK = b'\x0c\x00\x00\x00\x00\x00\x00\x00{ "":["\\n"]}'


@pytest.mark.parametrize("loader", [load_controlnet, load_base], ids=["controlnet", "base"])
@SETTINGS
@given(data=BYTES, suffix=st.sampled_from([".safetensors", ".ckpt", ".pth", ".bin"]))
@example(data=QUOTED_BREAK, suffix=".safetensors")
def test_any_bytes_are_refused_by_every_loader_in_one_line(tmp_path, loader, data, suffix):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"model{suffix}"
    path.write_bytes(data)
    with pytest.raises(Exception) as caught:
        loader(path)
    _one_line(caught.value)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing written beside it


@functools.cache
def _vae():
    from tiny import make_base

    return make_base().vae


@SETTINGS
@given(data=BYTES)
@example(data=QUOTED_BREAK)
def test_any_bytes_are_refused_as_a_vae_in_one_line(tmp_path, data):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "vae.safetensors"
    path.write_bytes(data)
    with pytest.raises(Exception) as caught:
        load_vae(path, like=_vae())
    _one_line(caught.value)


# ------------------------------------------------------------------------------------ more readers
@SETTINGS
@given(data=BYTES, suffix=st.sampled_from([".safetensors", ".pt"]))
def test_any_bytes_are_refused_by_the_lora_reader_in_one_line(tmp_path, data, suffix):
    from controlnet.formats import read_lora

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"lora{suffix}"
    path.write_bytes(data)
    try:
        read_lora(path)  # a header of no tensors is an empty LoRA; anything else is refused
    except Exception as e:
        _one_line(e)


@SETTINGS
@given(data=BYTES, suffix=st.sampled_from([".safetensors", ".pth"]))
# a header whose dtype is a line break, quoted by safetensors' reason (found by this test)
@example(data=b'\x14\x00\x00\x00\x00\x00\x00\x00  {"":[{"\\n":null}]}', suffix=".safetensors")
def test_any_bytes_are_refused_as_annotator_weights_in_one_line(tmp_path, data, suffix):
    from controlnet.annotators.hed import HEDNet
    from controlnet.annotators.weights import load_state_dict, load_strict

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"ControlNetHED{suffix}"
    path.write_bytes(data)
    with pytest.raises(Exception) as caught:
        load_strict(HEDNet(), load_state_dict(path), "ControlNetHED.pth (HED)")
    _one_line(caught.value)


#: names a Control-LoRA holds (original layout, low-rank factors beside whole tensors)
CONTROL_LORA_KEYS = st.sampled_from(
    [
        "input_hint_block.0.weight",
        "input_hint_block.0.bias",
        "input_hint_block.14.weight",
        "zero_convs.0.0.weight",
        "middle_block_out.0.weight",
        "input_blocks.0.0.weight.down",
        "input_blocks.0.0.weight.up",
        "input_blocks.1.0.in_layers.2.weight.down",
        "input_blocks.1.0.in_layers.2.weight.up",
        "time_embed.0.weight.down",
        "time_embed.0.bias",
        "stray",
    ]
)
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@functools.cache
def _unet():
    from tiny import make_base

    return make_base().unet


@SETTINGS
@given(tensors=st.dictionaries(CONTROL_LORA_KEYS, SHAPES, max_size=8))
def test_any_control_lora_is_built_or_refused_in_one_line(tmp_path, tensors):
    import torch
    from safetensors.torch import save_file

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "control-lora.safetensors"
    save_file(
        {"lora_controlnet": torch.zeros(1), **{k: torch.zeros(s) for k, s in tensors.items()}}, str(path)
    )
    try:
        load_controlnet(path, base_unet=_unet())
    except Exception as e:
        _one_line(e)


def test_a_header_that_claims_huge_tensors_allocates_nothing(tmp_path):
    """A 100-byte file whose header claims 2**40 floats per tensor: refused before any allocation
    (the process's peak memory does not move by more than the interpreter's noise)."""
    import resource

    header = {
        k: {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]} for k in ("a", "b")
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, loader in (("cn", load_controlnet), ("base", load_base)):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(_safetensors_like(json.dumps(header).encode(), b"\0" * 64))
        with pytest.raises(Exception) as caught:
            loader(path)
        _one_line(caught.value)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 256, grown_mb
