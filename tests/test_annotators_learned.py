"""Learned annotators: random weights in the real key layout load through the public path and give
maps of the right shape; missing weights give the documented error; nothing downloads."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import controlnet.annotators as A
from controlnet.annotators.hed import HEDNet, hed_edges
from controlnet.annotators.pose_net import PAF_INDEX, PAF_LIMBS, BodyPoseNet, decode_body


@pytest.fixture(autouse=True)
def annotator_dir(tmp_path, monkeypatch):
    d = tmp_path / "annotators"
    d.mkdir()
    monkeypatch.setenv("CONTROLNET_ANNOTATOR_DIR", str(d))
    return d


def photo(h=64, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_state(module: torch.nn.Module, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in module.state_dict().items()}


# ---- HED (ControlNetHED.pth) -------------------------------------------------------------------


def test_hed_layout_loads_and_gives_maps(annotator_dir):
    net = HEDNet()
    keys = net.state_dict()
    assert len(keys) == 37 and keys["norm"].shape == (1, 3, 1, 1)
    assert keys["block1.convs.0.weight"].shape == (64, 3, 3, 3)
    assert keys["block5.convs.2.weight"].shape == (512, 512, 3, 3)
    assert keys["block3.projection.weight"].shape == (1, 256, 1, 1)
    torch.save(random_state(net), annotator_dir / "ControlNetHED.pth")  # found by its released name
    out = A.annotate("hed", photo())
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    safe = A.annotate("hed", photo(), safe=True)
    assert set(np.unique(safe)) <= {0, 127, 255}
    scrib = A.annotate("scribble_hed", photo())
    assert scrib.shape == (64, 80, 3) and set(np.unique(scrib)) <= {0, 255}


def test_hed_combines_side_outputs_by_mean_and_sigmoid():
    net = HEDNet()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        biases = [0.5, -1.0, 2.0, 0.0, 1.5]
        for block, b in zip((net.block1, net.block2, net.block3, net.block4, net.block5), biases):
            block.projection.bias.fill_(b)
    edge = hed_edges(photo(), net)
    assert edge.shape == (64, 80)
    assert np.allclose(edge, 1 / (1 + np.exp(-np.mean(biases))), atol=1e-6)


def test_wrong_file_is_refused(tmp_path):
    bad = tmp_path / "not_hed.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"not a ControlNetHED.pth .*37 missing"):
        A.annotate("hed", photo(), weights=str(bad))
    pickle = tmp_path / "code.pth"
    torch.save({"x": object()}, pickle)  # needs full unpickling: refused by weights_only=True
    with pytest.raises(ValueError, match=r"cannot read code\.pth"):
        A.annotate("hed", photo(), weights=str(pickle))


# ---- OpenPose body (body_pose_model.pth) -------------------------------------------------------


def test_body_net_layout_loads_and_gives_maps(tmp_path):
    with torch.device("meta"):
        net = BodyPoseNet()
    keys = net.state_dict()
    assert len(keys) == 184
    assert keys["conv1_1.weight"].shape == (64, 3, 3, 3)
    assert keys["conv4_4_CPM.weight"].shape == (128, 256, 3, 3)
    assert keys["conv5_5_CPM_L1.weight"].shape == (38, 512, 1, 1)
    assert keys["conv5_5_CPM_L2.weight"].shape == (19, 512, 1, 1)
    assert keys["Mconv1_stage2_L1.weight"].shape == (128, 185, 7, 7)
    assert keys["Mconv7_stage6_L2.weight"].shape == (19, 128, 1, 1)
    path = tmp_path / "body_pose_model.safetensors"
    save_file(random_state(net), str(path))
    out = A.annotate("openpose", photo(48, 8), weights=str(path))  # the net sees it 184 px high
    assert out.shape == (48, 8, 3) and out.dtype == np.uint8


def synthetic_maps(keypoints: np.ndarray, h: int, w: int):
    """Heatmaps (Gaussian peaks) and part-affinity fields (unit vectors near each limb) for one person."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((h, w, 19), np.float32)
    for i, (x, y) in enumerate(keypoints):
        heat[:, :, i] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    paf = np.zeros((h, w, 38), np.float32)
    for (a, b), (cx, cy) in zip(PAF_LIMBS, PAF_INDEX):
        pa, pb = keypoints[a], keypoints[b]
        d = pb - pa
        u = d / np.linalg.norm(d)
        t = ((xx - pa[0]) * u[0] + (yy - pa[1]) * u[1]) / np.linalg.norm(d)
        dist = np.abs((xx - pa[0]) * u[1] - (yy - pa[1]) * u[0])
        near = (t >= -0.05) & (t <= 1.05) & (dist <= 3)
        paf[near, cx], paf[near, cy] = u[0], u[1]
    return heat, paf


FIGURE = np.array(
    [[96, 40], [96, 70], [70, 72], [60, 110], [55, 145], [122, 72], [132, 110], [137, 145], [80, 140],
     [78, 190], [76, 235], [112, 140], [114, 190], [116, 235], [90, 32], [102, 32], [82, 38], [110, 38]],
    np.float32,
)  # fmt: skip


def test_decoding_recovers_the_18_keypoints():
    h, w = 256, 192
    heat, paf = synthetic_maps(FIGURE, h, w)
    people = decode_body(heat, paf)
    assert len(people) == 1
    got = people[0].body
    assert got.shape == (18, 3) and np.all(got[:, 2] > 0.9)
    assert np.abs(got[:, 0] * w - FIGURE[:, 0]).max() <= 1 and np.abs(got[:, 1] * h - FIGURE[:, 1]).max() <= 1
    # two people side by side are kept apart
    heat1, paf1 = synthetic_maps(FIGURE, h, w + 200)
    heat2, paf2 = synthetic_maps(FIGURE + np.float32([200, 0]), h, w + 200)
    both = decode_body(np.maximum(heat1, heat2), paf1 + paf2)
    assert len(both) == 2
    xs = sorted(float(p.body[1, 0]) * (w + 200) for p in both)
    assert abs(xs[0] - 96) <= 1 and abs(xs[1] - 296) <= 1


# ---- transformers estimators from local folders ------------------------------------------------


def save_folder(model, path, prep):
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(prep))
    return path


def tiny_dpt(path):
    from transformers import DPTConfig, DPTForDepthEstimation

    cfg = DPTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16, head_in_index=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    prep = {"size": {"height": 32, "width": 32}, "keep_aspect_ratio": False, "image_mean": [0.5] * 3}
    return save_folder(DPTForDepthEstimation(cfg), path, prep)


def tiny_depth_anything(path):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )  # fmt: skip
    cfg = DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16,
        reassemble_hidden_size=32, patch_size=14, head_hidden_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    prep = {"size": {"height": 42, "width": 42}, "keep_aspect_ratio": True, "ensure_multiple_of": 14}
    return save_folder(DepthAnythingForDepthEstimation(cfg), path, prep)


def test_incomplete_transformers_weights_are_refused(tmp_path):
    from safetensors.torch import load_file

    folder = tiny_dpt(tmp_path / "dpt")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["head.head.0.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"incomplete weights in dpt: 1 tensors .*head\.head\.0\.weight"):
        A.annotate("depth_midas", photo(), weights=str(folder))


def test_depth_estimators_from_local_folders(annotator_dir, tmp_path):
    tiny_dpt(annotator_dir / "dpt-hybrid-midas")  # the default folder name
    out = A.annotate("depth_midas", photo())
    assert out.shape == (64, 80, 3) and out.min() == 0 and out.max() == 255  # min-max over the map
    normal = A.annotate("normal_midas", photo())
    assert normal.shape == (64, 80, 3)
    folder = tiny_depth_anything(tmp_path / "da")
    da = A.annotate("depth_anything", photo(50, 90), weights=str(folder))
    assert da.shape == (50, 90, 3)


def test_segmentation_from_local_folder(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(
        num_labels=150, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1],
        decoder_hidden_size=16, sr_ratios=[8, 4, 2, 1],
    )  # fmt: skip
    torch.manual_seed(0)
    folder = save_folder(
        SegformerForSemanticSegmentation(cfg), tmp_path / "seg", {"size": {"height": 64, "width": 64}}
    )
    out = A.annotate("segmentation", photo(), weights=str(folder))
    assert out.shape == (64, 80, 3)
    labels = A.colors_to_labels(out[:, :, :3])  # every pixel is an exact palette colour
    assert labels.min() >= 0 and labels.max() < 150
    with pytest.raises(ValueError, match="predicts 150 classes but the coco palette has 133"):
        A.annotate("segmentation", photo(), weights=str(folder), palette="coco")


# ---- missing weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "released"),
    [
        ("hed", "ControlNetHED.pth"),
        ("scribble_hed", "ControlNetHED.pth"),
        ("openpose", "body_pose_model.pth"),
        ("depth_midas", "dpt_hybrid-midas-501f0c75.pt"),
        ("normal_midas", "Intel/dpt-hybrid-midas"),
        ("depth_anything", "depth-anything"),
        ("segmentation", "upernet"),
    ],
)
def test_missing_weights_name_the_file_and_the_folder(name, released, annotator_dir):
    with pytest.raises(FileNotFoundError) as e:
        A.annotate(name, photo())
    msg = str(e.value)
    assert released in msg and str(annotator_dir) in msg and "weights=PATH" in msg
    assert "Nothing is downloaded" in msg
