"""The request schema: one declaration from which the command line, the API body, the web app and
the sidecar are derived, and the one check that reads every input image once."""

import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from controlnet import Family
from controlnet.choices import ControlMode, DType, Sampler
from controlnet.generation.check import CheckedRequest, check
from controlnet.generation.generate import generate
from controlnet.generation.request import ControlRequest, GenerationRequest, LoraRequest
from controlnet.schema import Kind, Owner, check_fields, params, to_dict
from tiny import make_base, make_controlnet

PARTS = (GenerationRequest, ControlRequest, LoraRequest)


def test_every_field_is_declared_with_its_help():
    for cls in PARTS:
        declared = params(cls)
        assert set(declared) == {f.name for f in dataclasses.fields(cls)}, cls
        for name, (_, spec, _) in declared.items():
            assert spec.help, f"{cls.__name__}.{name} has no help"
            if spec.minimum is not None and spec.maximum is not None:
                assert spec.minimum < spec.maximum


def test_defaults_are_within_their_own_bounds():
    for cls in (GenerationRequest, LoraRequest):
        check_fields(cls() if cls is GenerationRequest else cls(path="x"))
    check_fields(ControlRequest(image="x"))


def _values(cls):
    """A strategy of field values of ``cls`` within their declared bounds."""
    out = {}
    for name, (field, spec, _) in params(cls).items():
        if spec.kind is Kind.PARTS:
            continue
        default = field.default
        if field.default_factory is dict:
            out[name] = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)
        elif isinstance(default, bool):
            out[name] = st.booleans()
        elif isinstance(default, ControlMode | Sampler | DType) or hasattr(default, "value"):
            out[name] = st.sampled_from(list(type(default)))
        elif isinstance(default, int) or (default is None and spec.minimum is not None and name != "denoise"):
            lo = int(spec.minimum if spec.minimum is not None else 0)
            hi = int(min(spec.maximum if spec.maximum is not None else 10_000, 10**12))
            ints = st.integers(lo, hi)
            out[name] = ints if default is not None else st.none() | ints
        elif isinstance(default, float):
            lo, hi = spec.minimum, spec.maximum
            out[name] = st.floats(lo, hi, exclude_min=spec.exclusive_minimum, allow_nan=False)
        elif isinstance(default, str) or default is None or default is dataclasses.MISSING:
            text = st.text(max_size=20)
            out[name] = (
                text if isinstance(default, str) or default is dataclasses.MISSING else st.none() | text
            )
        elif isinstance(default, dict) or field.default_factory is dict:
            out[name] = st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3)
    return st.fixed_dictionaries(out)


@st.composite
def requests(draw):
    values = draw(_values(GenerationRequest))
    controls = [ControlRequest(**draw(_values(ControlRequest))) for _ in range(draw(st.integers(0, 2)))]
    loras = [LoraRequest(**draw(_values(LoraRequest))) for _ in range(draw(st.integers(0, 2)))]
    return GenerationRequest(**values, controls=controls, loras=loras)


@settings(max_examples=60, deadline=None)
@given(requests())
def test_json_round_trip_of_any_request_is_exact(request):
    data = to_dict(request)
    assert json.loads(json.dumps(data)) == data  # plain JSON
    again = GenerationRequest.from_dict(json.loads(json.dumps(data)))
    assert again == request
    assert check_fields(again) == request  # within bounds: the check changes nothing


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": "20"}, "steps: expected a whole number, got '20'"),
        ({"steps": 2.5}, "steps: expected a whole number, got 2.5"),
        ({"guidance": True}, "guidance: expected a number, got True"),
        ({"seed": "x"}, "seed: expected a whole number or null, got 'x'"),
        ({"prompt": None}, "prompt: expected text, got null"),
        ({"sampler": "plms"}, "unknown sampler 'plms'; expected one of: ddim"),
        ({"controls": [{"image": "a.png", "strength": "high"}]}, "control 0: strength: expected a number"),
        ({"controls": [{"image": "a.png", "mode": "loud"}]}, "unknown control 0 mode 'loud'"),
        ({"controls": [{}]}, "control 0"),
        ({"controls": {"image": "a.png"}}, "controls: expected a list"),
        ({"loras": [{"path": "l", "size": 1}]}, "loras[0]: unknown parameters ['size']"),
        ({"colour": "red"}, "unknown parameters ['colour']"),
        (
            {"controls": [{"image": "a.png", "control_type": True}]},
            "control 0: control_type: expected text or a whole number or null, got True",
        ),
        ({"controls": [{"image": "a.png", "control_type": 1.5}]}, "control_type: expected text or a whole"),
    ],
)
def test_reading_json_names_the_field_and_what_was_expected(data, message):
    with pytest.raises((ValueError, TypeError), match=None) as e:
        GenerationRequest.from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"guidance": math.nan}, "guidance must be >= 0 and <= 100, got nan"),
        ({"guidance": math.inf}, "guidance must be >= 0 and <= 100, got inf"),
        ({"guidance": 1e308}, "guidance must be >= 0 and <= 100"),
        ({"num_samples": 1_000_000}, "num_samples must be >= 1 and <= 64"),
        ({"steps": 0}, "steps must be >= 1 and <= 1000, got 0"),
        ({"seed": 2**70}, "seed must be between 0 and"),
        ({"seed": -5}, "seed must be between 0 and"),
        ({"eta": -0.1}, "eta must be in [0, 1], got -0.1"),
        ({"denoise": 0.0}, "denoise must be in (0, 1], got 0.0"),
        ({"width": 10**6, "height": 64}, "width must be between 64 and 4096 pixels"),
        ({"hires_scale": 0.5}, "hires_scale must be between 1 (off) and 4, got 0.5"),
        ({"controls": [ControlRequest("x", strength=math.nan)]}, "control 0: strength must be"),
        ({"controls": [ControlRequest("x", end=2.0)]}, "control 0: end must be in [0, 1], got 2.0"),
        ({"loras": [LoraRequest("l", scale=math.inf)]}, "loras[0]: scale must be"),
        ({"controls": [ControlRequest("x", control_type=-1)]}, "control 0: control_type must be >= 0"),
    ],
)
def test_numbers_must_be_finite_and_within_their_bounds(change, message):
    with pytest.raises(ValueError) as e:
        check_fields(GenerationRequest(**change))
    assert message in str(e.value)


def test_only_the_fields_the_server_sets_are_owned_by_it():
    server = {n for n, (_, spec, _) in params(GenerationRequest).items() if spec.owner is Owner.SERVER}
    assert server == {"base", "vae", "loras", "captioner", "dtype", "device", "fast", "offload", "fp8"}


# ---------------------------------------------------------------------------- the one check
@pytest.fixture
def images(tmp_path):
    paths = {}
    for name, size in (("cond", (64, 64)), ("init", (64, 64)), ("mask", (64, 64)), ("region", (64, 64))):
        arr = np.full((*size, 3), 200, np.uint8) if name != "mask" else np.zeros(size, np.uint8)
        paths[name] = str(tmp_path / f"{name}.png")
        Image.fromarray(arr).save(paths[name])
    return paths


def _request(images, **kw):
    control = ControlRequest(images["cond"], region_mask=images["region"])
    return GenerationRequest(
        prompt="x",
        controls=[control, ControlRequest(images["cond"])],
        init_image=images["init"],
        mask=images["mask"],
        resolution=64,
        steps=2,
        seed=1,
        **kw,
    )


def test_check_reads_each_input_once_and_generate_reads_no_file(images, monkeypatch):
    from PIL import Image as PILImage

    opened = []
    original = PILImage.open

    def counting(path, *a, **k):
        opened.append(str(path))
        return original(path, *a, **k)

    monkeypatch.setattr(PILImage, "open", counting)
    checked = check(_request(images))
    assert isinstance(checked, CheckedRequest)
    # one read per input; the control image serves two controls, named by each
    assert sorted(opened) == sorted(
        [images["cond"], images["cond"], images["init"], images["mask"], images["region"]]
    )
    assert set(checked.images) == {
        "controls[0].image",
        "controls[0].region_mask",
        "controls[1].image",
        "init_image",
        "mask",
    }
    assert (
        checked.request.sampler is Sampler.DDIM and checked.request.controls[0].mode is ControlMode.BALANCED
    )
    opened.clear()
    base = make_base(Family.SD1)
    cn = make_controlnet(base.unet, open_zero=True)
    generate(checked, base, [cn, cn], progress=False)
    assert opened == []  # every image came from the check


def test_generate_takes_only_a_checked_request(images):
    base = make_base(Family.SD1)
    with pytest.raises(TypeError, match="checked request"):
        generate(_request(images), base, [], progress=False)


def test_the_check_names_the_input_that_does_not_read(images, tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    bad = str(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"control 0: region mask: cannot read .*bad.png"):
        check(_request({**images, "region": bad}))
    with pytest.raises(FileNotFoundError, match=r"control 1: ControlNet nowhere\.safetensors does not exist"):
        req = _request(images)
        req.controls[1].controlnet = "nowhere.safetensors"
        check(req)


def test_every_field_has_a_flag_whose_help_shows_its_default():
    """The command line is derived from the schema: each field a user sets from it has a flag, and
    ``--help`` gives every default (a flag that takes no value is off unless given)."""
    from controlnet.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    flags = sub._option_string_actions
    for cls in (GenerationRequest, ControlRequest):
        for name, (field, spec, tp) in params(cls).items():
            if not spec.cli:
                continue
            flag = spec.flag or "--" + name.replace("_", "-")
            if tp is bool and field.default is True:
                flag = "--no-" + flag[2:]
            assert flag in flags, f"{cls.__name__}.{name} has no flag {flag}"
            action = flags[flag]
            required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if action.nargs != 0 and not required and name != "params":
                assert "default" in action.help, f"{flag}'s help does not show its default"


def test_the_api_field_tables_in_the_docs_are_the_schemas():
    """docs/app.md's request fields are written from the schema (`python tools/request_docs.py`)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "request_docs.py"
    spec = importlib.util.spec_from_file_location("request_docs", path)
    docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docs)
    assert docs.block() == docs.generated()


def test_a_name_or_number_field_takes_either_as_given():
    """``control_type`` takes a name (what it means is the loaded model's business) or a whole
    number (a float of a whole number read as one), and writes back what it was given."""
    for sent, read in (("depth", "depth"), (3, 3), (3.0, 3), ("2", "2")):
        req = GenerationRequest.from_dict({"controls": [{"image": "a.png", "control_type": sent}]})
        assert check_fields(req).controls[0].control_type == read
        assert type(req.controls[0].control_type) is type(read)
