"""init, transfer, compatibility checks, inspect and the CLI commands over checkpoint files."""

import pytest
import torch

from controlnet import Family
from controlnet.cli import main
from controlnet.formats import (
    CheckpointError,
    Format,
    check_compatible,
    detect,
    init_controlnet,
    inspect_checkpoint,
    load_controlnet,
    save_base,
    save_controlnet,
    transfer_controlnet,
)
from tiny import assert_same_state, make_base, make_controlnet

NEW = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")
ENCODER = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


@pytest.fixture
def sd1_base_file(tmp_path):
    base = make_base(Family.SD1)
    return base, save_base(base, tmp_path / "sd1.safetensors", Format.ORIGINAL)[0]


def test_init_copies_every_twin_exactly(sd1_base_file):
    base, path = sd1_base_file
    before = torch.get_rng_state()
    cn = init_controlnet(path, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    unet = base.unet.state_dict()
    copied = 0
    for k, t in cn.state_dict().items():
        if k.startswith(NEW):
            continue
        assert torch.equal(t, unet[k]), k
        copied += 1
    assert copied == sum(k.startswith(ENCODER) for k in unet)
    assert all(torch.count_nonzero(p) == 0 for z in cn.zero_convs() for p in z.parameters())
    hint = cn.controlnet_cond_embedding.conv_in.weight
    assert torch.count_nonzero(hint) > 0
    assert torch.equal(hint, init_controlnet(path, seed=3).controlnet_cond_embedding.conv_in.weight)
    assert not torch.equal(hint, init_controlnet(path, seed=4).controlnet_cond_embedding.conv_in.weight)


def test_init_command_writes_what_the_library_makes(sd1_base_file, tmp_path, capsys):
    _, path = sd1_base_file
    out = tmp_path / "new.safetensors"
    assert main(["init", "--base", str(path), "--out", str(out), "--to", "original", "--with-base"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert detect(out).kinds == ("base", "controlnet")  # a v1.0-style file, as the original tool writes
    assert_same_state(load_controlnet(out), init_controlnet(path, seed=0))


def trained(cn, seed=5):
    """``cn`` after 'training': every tensor moved, so control differs from its base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return cn


def test_transfer_is_exact_to_the_formula(tmp_path, capsys):
    a, b = make_base(Family.SD1, seed=0), make_base(Family.SD1, seed=7)  # b: a "community" model
    cn = trained(make_controlnet(a.unet, open_zero=True))
    files = {
        "control": save_controlnet(cn, tmp_path / "cn.safetensors", Format.ORIGINAL)[0],
        "a": save_base(a, tmp_path / "a.safetensors", Format.CONTROLNET)[0],
        "b": save_base(b, tmp_path / "b", Format.DIFFUSERS)[0],
    }
    new = transfer_controlnet(files["control"], files["a"], files["b"])
    sa, sb, c = a.unet.state_dict(), b.unet.state_dict(), cn.state_dict()
    twins = 0
    for k, t in new.state_dict().items():
        if k in sa:
            assert torch.equal(t, c[k] + (sb[k] - sa[k])), k
            twins += 1
        else:  # hint encoder and zero convs keep what training made
            assert k.startswith(NEW) and torch.equal(t, c[k])
    assert twins == sum(k.startswith(ENCODER) for k in sa)

    out = tmp_path / "moved.safetensors"
    argv = ["transfer", "--control", str(files["control"]), "--from-base", str(files["a"])]
    assert main([*argv, "--to-base", str(files["b"]), "--out", str(out)]) == 0
    assert_same_state(load_controlnet(out), new)
    capsys.readouterr()


def test_transfer_refuses_other_architectures(tmp_path, capsys):
    a, b = make_base(Family.SD1), make_base(Family.SD2)
    cn = make_controlnet(a.unet)
    with pytest.raises(CheckpointError, match="base B"):
        transfer_controlnet(cn, a, b)
    files = [
        save_controlnet(cn, tmp_path / "cn.safetensors")[0],
        save_base(a, tmp_path / "a.safetensors")[0],
        save_base(b, tmp_path / "b.safetensors")[0],
    ]
    out = tmp_path / "out.safetensors"
    argv = ["transfer", "--control", str(files[0]), "--from-base", str(files[1]), "--to-base", str(files[2])]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cn.safetensors" in err and "b.safetensors" in err and "SD1.x" in err and "SD2.x" in err
    assert not out.exists()


def test_check_compatible_names_both_models():
    sd1, sdxl = make_base(Family.SD1), make_base(Family.SDXL)
    cn = make_controlnet(sd1.unet)
    check_compatible(cn, sd1)
    check_compatible(cn, make_controlnet(sd1.unet))  # two ControlNets for one base
    with pytest.raises(CheckpointError) as e:
        check_compatible(cn, sdxl, controlnet_name="canny.safetensors", base_name="sdxl_base.safetensors")
    msg = str(e.value)
    assert "canny.safetensors (SD1.x" in msg and "sdxl_base.safetensors (SDXL" in msg
    assert "addition_embed_type None vs 'text_time'" in msg and "cross_attention_dim 16 vs 32" in msg


def test_inspect_tells_format_family_parts_dtype_and_options(tmp_path, capsys):
    base = make_base(Family.SD2).to(dtype=torch.float16)
    cn = make_controlnet(base.unet, global_pool=True).half()
    path = save_controlnet(cn, tmp_path / "control_sd21_tiny.safetensors", Format.ORIGINAL, base=base)[0]
    info = inspect_checkpoint(path)
    assert (
        info.format is Format.ORIGINAL
        and info.layout.startswith("ControlNet v1.0 style")
        and info.family == "SD2.x"
    )
    assert info.parameters["controlnet"] == sum(p.numel() for p in cn.parameters())
    assert info.parameters["unet"] == sum(p.numel() for p in base.unet.parameters())
    assert set(info.parameters) == {"unet", "vae", "text_encoder (OpenCLIP ViT-H)", "controlnet"}
    # BaseModel.to(float16) keeps the VAE in float32; the file stacks OpenCLIP's q, k, v in one tensor
    vae = len(base.vae.state_dict())
    assert info.dtypes == {"float16": len(detect(path).tensors) - vae, "float32": vae}
    assert info.controlnet["global_pool"] is True and info.controlnet["residuals"] == 13
    assert main(["inspect", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == "\n".join(info.lines()) and "global_pool=True" in printed

    folder = save_base(make_base(Family.SDXL), tmp_path / "xl", Format.DIFFUSERS)[0]
    info = inspect_checkpoint(folder)
    assert info.format is Format.DIFFUSERS and info.family == "SDXL"
    assert set(info.parameters) == {"unet", "vae", "text_encoder", "text_encoder_2"}


def test_convert_command(tmp_path, capsys):
    cn = make_controlnet(make_base(Family.SD1).unet, open_zero=True)
    src = save_controlnet(cn, tmp_path / "cn.safetensors", Format.CONTROLNET)[0]
    dst = tmp_path / "cn_diffusers"
    assert main(["convert", str(src), str(dst), "--to", "diffusers", "--dtype", "fp16"]) == 0
    assert f"wrote {dst} (diffusers)" in capsys.readouterr().out
    back = load_controlnet(dst)
    assert back.dtype == torch.float16
    assert all(torch.equal(t, cn.state_dict()[k].half()) for k, t in back.state_dict().items())
    # an existing output is kept unless --force
    assert main(["convert", str(src), str(dst), "--to", "diffusers"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_controlnet(dst).dtype == torch.float16
    assert main(["convert", str(src), str(dst), "--to", "diffusers", "--force"]) == 0
    assert load_controlnet(dst).dtype == torch.float32
    # --force replaces a file by a folder and a folder by a file, leaving nothing else behind
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 0
    assert main(["convert", str(src), str(out), "--to", "controlnet", "--force"]) == 0
    assert out.is_file() and load_controlnet(out).dtype == torch.float32
    assert main(["convert", str(src), str(out), "--to", "diffusers", "--force"]) == 0
    assert out.is_dir() and load_controlnet(out).dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn.safetensors", "cn_diffusers", "out.safetensors"]


def _dit_case(family):
    """(base A, base B: A fine-tuned, a trained ControlNet of A, where each of its copied tensors
    came from in A, the parts of A whose every tensor it copies)."""
    from controlnet.families.zimage.controlnet import ZImageControlNetConfig
    from test_qwenimage_generate import qwen_base
    from test_sd3_generate import sd3_base
    from test_zimage_generate import zimage_base
    from tiny_flux import tiny_flux_base

    make = {"flux": tiny_flux_base, "sd3": sd3_base, "zimage": zimage_base, "qwenimage": qwen_base}[family]
    a, b = make(), make()
    trained(b.transformer, seed=7)  # the fine-tune
    if family == "zimage":  # control blocks copy the main layers they are placed at (0 and 2)
        cn = trained(a.new_controlnet(ZImageControlNetConfig(control_layers_places=(0, 2))))
        places = {"0": "0", "1": "2"}

        def source(k):
            kind, index, rest = k.split(".", 2)
            if kind == "control_layers":
                return f"layers.{places[index]}.{rest}"
            return f"noise_refiner.{index}.{rest}" if kind == "control_noise_refiner" else None

        return a, b, cn, source, ("layers.0.", "layers.2.", "noise_refiner.0.")
    config = {"num_layers": 1, "num_single_layers": 1} if family == "flux" else {"num_layers": 1}
    cn = trained(a.new_controlnet(config))
    must = {
        "flux": ("transformer_blocks.0.", "single_transformer_blocks.0.", "x_embedder."),
        "sd3": ("transformer_blocks.0.", "pos_embed."),
        "qwenimage": ("transformer_blocks.0.", "img_in.", "txt_in."),
    }[family]
    return a, b, cn, (lambda k: k), must


@pytest.mark.parametrize("family", ["flux", "sd3", "zimage", "qwenimage"])
def test_a_transformer_controlnet_transfers_by_the_same_formula(tmp_path, capsys, family):
    """A transformer ControlNet moves to another base of its family (a "fine-tune") as a UNet one
    does: each copied tensor (blocks, embedders; Z-Image's control blocks, copies of the main
    layers they are placed at) gains B - A of its original, the zero layers and the condition's
    embedder stay; a ControlNet of another family is refused naming the files."""
    from test_sd3_generate import sd3_base
    from tiny_flux import tiny_flux_base

    a, b, cn, source, must = _dit_case(family)
    files = {
        "control": save_controlnet(cn, tmp_path / "cn.safetensors")[0],
        "a": save_base(a, tmp_path / "a.safetensors")[0],
        "b": save_base(b, tmp_path / "b.safetensors")[0],
    }
    new = transfer_controlnet(files["control"], files["a"], files["b"])
    sa, sb, c = a.transformer.state_dict(), b.transformer.state_dict(), cn.state_dict()
    moved = {k: source(k) for k in c if source(k) in sa and not k.startswith("controlnet_")}
    copied = set(moved.values())
    for part in must:  # each copied part whole (none of its tensors missed)
        assert any(k.startswith(part) for k in sa) and all(k in copied for k in sa if k.startswith(part)), (
            part
        )
    for k, t in new.state_dict().items():
        want = c[k] + (sb[moved[k]] - sa[moved[k]]) if k in moved else c[k]  # (zero layers, embedder)
        assert torch.equal(t, want), k
    assert type(new) is type(cn) and len(moved) < len(c)

    out = tmp_path / "moved.safetensors"
    argv = ["transfer", "--control", str(files["control"]), "--from-base", str(files["a"])]
    assert main([*argv, "--to-base", str(files["b"]), "--out", str(out)]) == 0
    assert_same_state(load_controlnet(out), new)
    capsys.readouterr()

    other = save_base(sd3_base() if family != "sd3" else tiny_flux_base(), tmp_path / "other.safetensors")[0]
    with pytest.raises(CheckpointError, match=r"other\.safetensors"):
        transfer_controlnet(files["control"], files["a"], other)
    assert main([*argv, "--to-base", str(other), "--out", str(tmp_path / "no.safetensors")]) == 2
    err = capsys.readouterr().err
    assert (
        "cn.safetensors" in err and "other.safetensors" in err and not (tmp_path / "no.safetensors").exists()
    )


def test_a_unet_controlnet_and_a_transformer_base_are_refused_in_one_line(tmp_path, capsys):
    from tiny_flux import tiny_flux_base

    sd1 = make_base(Family.SD1)
    files = [
        save_controlnet(make_controlnet(sd1.unet), tmp_path / "cn.safetensors")[0],
        save_base(tiny_flux_base(), tmp_path / "flux.safetensors")[0],
        save_base(sd1, tmp_path / "sd1.safetensors")[0],
    ]
    argv = ["transfer", "--control", str(files[0]), "--from-base", str(files[1]), "--to-base", str(files[2])]
    assert main([*argv, "--out", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "flux.safetensors: holds a Flux.1 base model, not a UNet base" in err
    )
    assert not (tmp_path / "out.safetensors").exists()
