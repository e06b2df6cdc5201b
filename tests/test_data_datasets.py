"""Data set layouts, item tensors, on-the-fly annotators, and bad input named by file and line."""

import json
import sys
import types

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from controlnet.cli import main
from controlnet.data.datasets import DatasetError, Layout, open_dataset, resize_center_crop
from controlnet.data.fill50k import generate
from controlnet.imageio import read_image, save_png


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def canny(image):
    edges = cv2.Canny(image, 100, 200)
    return np.repeat(edges[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("d") / "fill", 5, size=32, seed=0, progress=False, workers=1)


def _pairs(root, n=3, h=24, w=40):
    """n (target, condition) PNG pairs under root/images and root/conds."""
    for i in range(n):
        save_png(_image(h, w, i), root / "images" / f"{i}.png")
        save_png(_image(h, w, 100 + i), root / "conds" / f"{i}.png")


def _check_item(item, target, cond, prompt, index):
    assert item["target"].dtype == item["cond"].dtype == torch.float32
    assert item["target"].shape == item["cond"].shape == (3, *target.shape[:2])
    assert torch.equal(item["target"], torch.from_numpy(target).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(item["cond"], torch.from_numpy(cond).permute(2, 0, 1).float() / 255)
    assert item["target"].min() >= -1 and item["target"].max() <= 1
    assert item["cond"].min() >= 0 and item["cond"].max() <= 1
    assert (item["prompt"], item["index"]) == (prompt, index)


def test_prompt_json_layout(fill):
    ds = open_dataset(fill)
    lines = [json.loads(x) for x in (fill / "prompt.json").read_text().splitlines()]
    assert ds.layout is Layout.PROMPT_JSON and len(ds) == 5 and ds.skipped == []
    for i, line in enumerate(lines):
        target, cond = read_image(fill / line["target"]), read_image(fill / line["source"])
        _check_item(ds[i], target, cond, line["prompt"], i)
        assert ds.prompt(i) == line["prompt"]
    assert open_dataset(fill / "prompt.json").entries == ds.entries  # the index file works too


@pytest.mark.parametrize("names", [("image", "conditioning_image", "text"), ("target", "source", "prompt")])
@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_metadata_layouts(tmp_path, names, kind):
    _pairs(tmp_path)
    rows = [
        {names[0]: f"images/{i}.png", names[1]: f"conds/{i}.png", names[2]: f"prompt {i}"} for i in range(3)
    ]
    if kind == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        body = "\n".join(",".join(r.values()) for r in rows)
        (tmp_path / "metadata.csv").write_text(",".join(names) + "\n" + body + "\n")
    ds = open_dataset(tmp_path)
    assert ds.layout is (Layout.METADATA_JSONL if kind == "jsonl" else Layout.METADATA_CSV)
    for i in range(3):
        target, cond = read_image(tmp_path / f"images/{i}.png"), read_image(tmp_path / f"conds/{i}.png")
        _check_item(ds[i], target, cond, f"prompt {i}", i)


def test_image_folder_with_an_annotator_and_txt_prompts(tmp_path):
    _pairs(tmp_path, n=2)
    (tmp_path / "images" / "0.txt").write_text("a red square\n")
    ds = open_dataset(tmp_path / "images", annotator=canny)
    assert ds.layout is Layout.IMAGE_FOLDER and len(ds) == 2
    for i, prompt in enumerate(["a red square", ""]):
        target = read_image(tmp_path / f"images/{i}.png")
        _check_item(ds[i], target, canny(target), prompt, i)
    with pytest.raises(DatasetError, match="needs an annotator"):
        open_dataset(tmp_path / "images")


def test_annotators_get_their_params_and_a_seed_when_they_take_one(tmp_path, monkeypatch):
    _pairs(tmp_path, n=3)
    calls = []

    def seeded(image, *, seed, level):
        calls.append((seed, level))
        return np.full(image.shape[:2], level, np.uint8)  # (H, W) grey is accepted

    ds = open_dataset(tmp_path / "images", annotator=seeded, annotator_params={"level": 51})
    assert torch.allclose(ds[2]["cond"], torch.full((3, 24, 40), 0.2)) and calls == [(2, 51)]

    registry = types.ModuleType("controlnet.annotators")  # names resolve lazily through the registry
    registry.annotate = lambda name, image, **kw: canny(image) if name == "canny" else 1 / 0
    monkeypatch.setitem(sys.modules, "controlnet.annotators", registry)
    by_name = open_dataset(tmp_path / "images", annotator="canny")
    assert torch.equal(by_name[1]["cond"], open_dataset(tmp_path / "images", annotator=canny)[1]["cond"])


def test_annotator_output_of_another_size_is_an_error(tmp_path):
    _pairs(tmp_path, n=1)
    ds = open_dataset(tmp_path / "images", annotator=lambda im: im[::2])
    with pytest.raises(DatasetError, match=r"0.png: the annotator returned a 40x12 condition for a 40x24"):
        ds[0]


def test_resolution_resizes_both_with_one_geometry(tmp_path):
    _pairs(tmp_path, n=1, h=30, w=50)
    labels = np.zeros((30, 50, 3), np.uint8)
    labels[:, 20:] = (10, 20, 30)
    save_png(labels, tmp_path / "labels.png")
    rows = [
        {"target": "images/0.png", "source": "images/0.png", "prompt": "p"}
    ]  # the condition is the target
    (tmp_path / "prompt.json").write_text(json.dumps(rows[0]) + "\n")
    item = open_dataset(tmp_path, resolution=16)[0]
    assert item["target"].shape == item["cond"].shape == (3, 16, 16)
    assert torch.allclose(item["cond"] * 2 - 1, item["target"], atol=1e-6)  # aligned pixel for pixel
    (tmp_path / "prompt.json").write_text(json.dumps({**rows[0], "source": "labels.png"}) + "\n")
    near = open_dataset(tmp_path, resolution=16, nearest_condition=True)[0]["cond"]
    values = {tuple(v) for v in (near * 255).round().int().reshape(3, -1).T.tolist()}
    assert values == {(0, 0, 0), (10, 20, 30)}  # nearest: no blended labels
    up = resize_center_crop(labels, 64)
    assert up.shape == (64, 64, 3)


def _bad_set(root):
    """A prompt.json with one good line and one of every kind of bad line."""
    _pairs(root, n=2)
    save_png(_image(10, 10, 9), root / "conds" / "small.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    good = {"target": "images/0.png", "source": "conds/0.png", "prompt": "fine"}
    lines = [
        json.dumps(good),
        json.dumps({**good, "target": "images/missing.png"}),
        json.dumps({**good, "source": "broken.png"}),
        json.dumps({**good, "source": "conds/small.png"}),
        '{"target": "images/1.png", "source": ',
        json.dumps({"target": "images/1.png", "source": "conds/1.png"}),
        "",
        json.dumps({**good, "target": "images/1.png", "source": "conds/1.png", "prompt": "also fine"}),
    ]
    (root / "prompt.json").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (2, r"line 2: no such image: images/missing.png"),
        (3, r"line 3: cannot read broken.png as an image"),
        (4, r"line 4: condition conds/small.png is 10x10 but target images/0.png is 40x24"),
        (5, r"line 5: malformed JSON"),
        (6, r"line 6: no 'text' \(or 'prompt'\) field"),
    ],
)
def test_every_bad_entry_is_named_by_file_and_line(tmp_path, line, message):
    _bad_set(tmp_path)
    lines = (tmp_path / "prompt.json").read_text().splitlines()
    keep = [lines[0], lines[line - 1]]  # the good line, then the bad one (which becomes line 2)
    (tmp_path / "prompt.json").write_text("\n".join(keep) + "\n")
    with pytest.raises(DatasetError, match="prompt.json " + message.replace(f"line {line}", "line 2")):
        open_dataset(tmp_path)


def test_skip_bad_drops_and_counts_every_bad_entry(tmp_path):
    _bad_set(tmp_path)
    with pytest.raises(DatasetError, match="line 2"):
        open_dataset(tmp_path)
    ds = open_dataset(tmp_path, skip_bad=True)
    assert [ds.prompt(i) for i in range(len(ds))] == ["fine", "also fine"]
    assert [s.where.rsplit(" ", 1)[1] for s in ds.skipped] == ["2", "3", "4", "5", "6"]
    assert "no such image" in str(ds.skipped[0]) and "malformed JSON" in ds.skipped[3].reason
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 1]


def test_csv_problems_name_their_line(tmp_path):
    _pairs(tmp_path, n=2)
    (tmp_path / "metadata.csv").write_text("image,text\nimages/0.png,a\n")
    with pytest.raises(
        DatasetError, match=r"metadata.csv line 1: no 'conditioning_image' \(or 'source'\) column"
    ):
        open_dataset(tmp_path)
    (tmp_path / "metadata.csv").write_text(
        "image,conditioning_image,text\nimages/0.png,conds/0.png,a\nimages/1.png\n"
    )
    with pytest.raises(DatasetError, match=r"metadata.csv line 3: 3 columns expected, fewer found"):
        open_dataset(tmp_path)
    assert len(open_dataset(tmp_path, skip_bad=True)) == 1


def test_empty_prompt_files_are_bad(tmp_path):
    _pairs(tmp_path, n=2)
    (tmp_path / "images" / "1.txt").write_text("  \n")
    with pytest.raises(DatasetError, match=r"1.png: 1.txt: empty prompt file"):
        open_dataset(tmp_path / "images", annotator=canny)
    ds = open_dataset(tmp_path / "images", annotator=canny, skip_bad=True)
    assert len(ds) == 1 and ds.skipped[0].where == "1.png"


def test_damage_after_opening_is_named_when_loading(tmp_path):
    _pairs(tmp_path, n=1)
    (tmp_path / "prompt.json").write_text(
        json.dumps({"target": "images/0.png", "source": "conds/0.png", "prompt": "p"}) + "\n"
    )
    ds = open_dataset(tmp_path)
    data = (tmp_path / "images/0.png").read_bytes()
    (tmp_path / "images/0.png").write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    with pytest.raises(DatasetError, match=r"prompt.json line 1: cannot read .*0.png as an image"):
        ds[0]
    assert ds.prompt(0) == "p"  # prompts need no images


def test_collate_batches_and_refuses_mixed_sizes(fill, tmp_path):
    ds = open_dataset(fill)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    assert batch["target"].shape == batch["cond"].shape == (4, 3, 32, 32)
    assert batch["prompt"] == [ds.prompt(i) for i in range(4)] and batch["index"].tolist() == [0, 1, 2, 3]
    save_png(_image(20, 20, 0), tmp_path / "a.png")
    save_png(_image(30, 20, 0), tmp_path / "b.png")
    mixed = open_dataset(tmp_path, annotator=canny)
    with pytest.raises(DatasetError, match="open the data set with a resolution"):
        mixed.collate([mixed[0], mixed[1]])
    assert open_dataset(tmp_path, annotator=canny, resolution=16).collate([mixed[0]])["target"].shape[0] == 1


def test_fingerprint_follows_what_items_depend_on(fill):
    a = open_dataset(fill).fingerprint()
    assert a == open_dataset(fill).fingerprint()
    assert a != open_dataset(fill, resolution=16).fingerprint()
    assert a != open_dataset(fill, annotator=canny).fingerprint()


def test_cli_check_reports_skipped_entries(tmp_path, capsys):
    _bad_set(tmp_path)
    assert main(["data", "check", str(tmp_path)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "2 items, 5 skipped" in out and out.count("skipped ") == 5
