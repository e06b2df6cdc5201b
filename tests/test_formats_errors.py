"""Bad input: every problem is a CheckpointError that names the file and the problem, and nothing
is written."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from controlnet import Family
from controlnet.cli import main
from controlnet.formats import (
    BaseConfig,
    CheckpointError,
    Format,
    load_base,
    load_controlnet,
    save_base,
    save_controlnet,
)
from controlnet.formats.build import controlnet_metadata
from controlnet.formats.original import base_tensors, controlnet_tensors
from tiny import make_base, make_controlnet, make_unet, released_file

SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def cn():
    return make_controlnet(make_unet(Family.SD1), open_zero=True)


def original_file(path, cn, edit):
    """An original-layout ControlNet file with our metadata, its tensors changed by ``edit``."""
    tensors = controlnet_tensors(cn)
    edit(tensors)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(path),
        controlnet_metadata(cn.unet_config, cn.config),
    )
    return path


def test_missing_key_is_listed(cn, tmp_path):
    path = original_file(
        tmp_path / "cn.safetensors", cn, lambda t: t.pop("control_model.zero_convs.3.0.bias")
    )
    with pytest.raises(
        CheckpointError,
        match=r"cn\.safetensors: ControlNet: missing keys \(1\): control_model\.zero_convs\.3\.0\.bias",
    ):
        load_controlnet(path)


def test_many_missing_keys_are_listed_and_counted(cn, tmp_path):
    def drop_mid(t):
        for k in [k for k in t if k.startswith("control_model.middle_block.")]:
            del t[k]

    path = original_file(tmp_path / "cn.safetensors", cn, drop_mid)
    with pytest.raises(CheckpointError) as e:
        load_controlnet(path)
    assert re.search(r"missing keys \(\d+\): control_model\.middle_block\.0\.emb_layers", str(e.value))
    assert "more" in str(e.value)


def test_unexpected_keys_are_listed(cn, tmp_path):
    def add(t):
        t["control_model.zero_convs.99.0.weight"] = torch.zeros(1)
        t["lora_unet_down.alpha"] = torch.zeros(1)

    path = original_file(tmp_path / "cn.safetensors", cn, add)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): lora_unet_down\.alpha"):
        load_controlnet(path)  # a key under no known prefix is refused first
    path = original_file(
        tmp_path / "cn2.safetensors", cn, lambda t: t.update({"control_model.extra.weight": torch.zeros(1)})
    )
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): control_model\.extra\.weight"):
        load_controlnet(path)


def test_shape_mismatch_names_the_key_and_both_shapes(cn, tmp_path):
    key = "control_model.input_hint_block.0.weight"
    path = original_file(tmp_path / "cn.safetensors", cn, lambda t: t.update({key: torch.zeros(4, 1, 3, 3)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{key}: file (4, 1, 3, 3), model (4, 3, 3, 3)")):
        load_controlnet(path)


def test_truncated_files(cn, tmp_path):
    good = save_controlnet(cn, tmp_path / "good.safetensors")[0]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated or corrupt safetensors"):
        load_controlnet(cut)
    pickled = released_file(tmp_path / "good.pth", controlnet_tensors(cn))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pickled.read_bytes()[: pickled.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: truncated or corrupt torch checkpoint"):
        load_controlnet(cut)


def test_unknown_formats(tmp_path):
    cases = {
        "empty.safetensors": (b"", "the file is empty"),
        "noise.ckpt": (bytes(range(256)) * 4, "unknown file format"),
        "config.json": (b'{"_class_name": "UNet2DConditionModel"}', "unknown file format"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: {message}"):
            load_controlnet(tmp_path / name)
    save_file({"some.other.model": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"other\.safetensors: unknown checkpoint layout"):
        load_controlnet(tmp_path / "other.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="unknown folder"):
        load_base(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_base(tmp_path / "missing.ckpt")


class Payload:
    """What a malicious pickle carries: unpickling it would run code."""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_with_anything_but_tensors_are_refused(cn, tmp_path):
    payload = Payload()
    payload.marker = str(tmp_path / "pwned")
    torch.save({"state_dict": controlnet_tensors(cn), "callback": payload}, tmp_path / "evil.ckpt")
    with pytest.raises(
        CheckpointError, match=r"evil\.ckpt: the pickle holds objects other than plain tensors"
    ):
        load_controlnet(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()
    torch.save({**controlnet_tensors(cn), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(
        CheckpointError, match=r"mixed\.pth: the state dict holds entries that are not tensors: epoch"
    ):
        load_controlnet(tmp_path / "mixed.pth")


def test_asking_a_file_for_what_it_does_not_hold(cn, tmp_path):
    control_only = save_controlnet(cn, tmp_path / "v11.safetensors", Format.ORIGINAL)[0]
    with pytest.raises(CheckpointError, match=r"v11\.safetensors: holds no base model"):
        load_base(control_only)
    base = save_base(make_base(Family.SD1), tmp_path / "sd.safetensors", Format.ORIGINAL)[0]
    with pytest.raises(CheckpointError, match=r"sd\.safetensors: holds no ControlNet"):
        load_controlnet(base)


def test_a_base_file_missing_a_part(tmp_path):
    base = make_base(Family.SD1)
    tensors = {k: v for k, v in base_tensors(base).items() if not k.startswith("first_stage_model.")}
    path = released_file(tmp_path / "no_vae.ckpt", tensors, "ckpt")
    with pytest.raises(CheckpointError, match=r"no_vae\.ckpt: has no vae \(first_stage_model\.\* keys\)"):
        load_base(path, config=BaseConfig.of(base))


def test_a_config_less_file_that_no_original_layout_can_hold(tmp_path):
    """Without a config the architecture is read off the tensors (test_formats_infer), but the
    original layout always has 32 norm groups: 8 channels cannot be such a file."""
    unet = make_unet(Family.SD1)  # widths 8 and 16
    path = released_file(tmp_path / "odd.pth", controlnet_tensors(make_controlnet(unet)))
    with pytest.raises(CheckpointError, match=r"odd\.pth: width 8 is not a multiple of 32"):
        load_controlnet(path)


def test_nothing_is_written_on_error(cn, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{" + b"\x00" * 7)
    out = tmp_path / "out"
    assert main(["convert", str(bad), str(out), "--to", "diffusers"]) == 2
    assert "bad.safetensors" in capsys.readouterr().err
    # a failure while writing leaves neither the output nor a temporary file
    import controlnet.formats.ours as ours

    def fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ours, "save_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_controlnet(cn, tmp_path / "cn.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]
    with pytest.raises(ValueError, match="written as safetensors"):
        save_controlnet(cn, tmp_path / "cn.ckpt", Format.ORIGINAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_no_lenient_loading_anywhere():
    """Copy-and-verify only: no strict=False, and every torch.load refuses arbitrary objects."""
    code = {p: p.read_text() for p in SRC.rglob("*.py")}
    assert not [p for p, text in code.items() if re.search(r"strict\s*=\s*False", text)]
    calls = [(p, m) for p, text in code.items() for m in re.findall(r"torch\.load\([^)]*\)", text)]
    assert calls and all("weights_only=True" in m for _, m in calls)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(cn, tmp_path, value, capsys):
    def spoil(t):
        t["control_model.zero_convs.2.0.weight"][0, 0, 0, 0] = value

    path = original_file(tmp_path / "spoiled.safetensors", cn, spoil)
    with pytest.raises(
        CheckpointError, match=r"spoiled\.safetensors: tensor 'control_model\.zero_convs\.2\.0\.weight'"
    ):
        load_controlnet(path)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(path), str(out), "--to", "controlnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN or infinite values" in err and len(err.splitlines()) == 1 and not out.exists()


def test_a_base_model_with_a_weight_that_is_not_finite_is_refused(tmp_path):
    base = make_base(Family.SD1)
    with torch.no_grad():
        base.unet.conv_out.bias[0] = float("nan")
    save_base(base, tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match=r"base\.safetensors: tensor '[^']*conv_out\.bias' holds NaN"):
        load_base(tmp_path / "base.safetensors")


def test_a_safetensors_file_whose_header_length_begins_like_a_pickle_is_read_as_safetensors(tmp_path):
    """The first byte of a safetensors file is its header's length, little-endian: 0x80 there is
    a length, not the pickle marker it also is."""
    from controlnet.formats.checkpoint import open_tensors

    for pad in range(300):  # find a header whose length's low byte is 0x80
        path = tmp_path / "file.safetensors"
        save_file({"w" * (pad + 1): torch.zeros(1)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 was made")
    assert open_tensors(path).kind == "safetensors"


def test_tensors_read_from_safetensors_are_aligned_and_compute_like_fresh_ones(tmp_path):
    """A file's tensors start wherever its header ends; read, each one is at an address CPU
    kernels align to (their rounding depends on it), holds the file's values, and a product with
    it has the bits of the same product with the values allocated afresh."""
    from safetensors.torch import save_file

    from controlnet.formats.checkpoint import open_tensors

    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(96, 80, generator=g), "b": torch.randn(3, generator=g)}
    x = torch.randn(64, 80, generator=g)
    for pad in range(0, 64, 8):  # metadata of several lengths: the data starts at other offsets
        path = tmp_path / f"pad{pad}.safetensors"
        save_file(weights, str(path), metadata={"pad": "x" * pad})
        tf = open_tensors(path)
        for key, want in weights.items():
            got = tf.get(key)
            assert got.data_ptr() % 64 == 0 and torch.equal(got, want), (pad, key)
        assert torch.equal(x @ tf.get("w").T, x @ weights["w"].clone().T)
    cut = tmp_path / "cut.safetensors"
    save_file({"w": weights["w"]}, str(cut), metadata={"pad": "xyz"})
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        open_tensors(cut).get("w")
