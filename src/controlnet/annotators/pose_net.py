"""The OpenPose body network (CMU's COCO-18 model, as released in body_pose_model.pth) and the
decoding of its outputs into people.

Network: a VGG-19 front (to conv4_2) plus two CPM layers gives 128-channel features at 1/8 scale;
six stages of two branches follow, branch L1 predicting 38 part-affinity-field channels (19
limbs x (x, y)) and L2 19 heatmaps (18 parts + background); stages 2-6 read the previous
stage's outputs concatenated with the features (38 + 19 + 128 = 185 channels). The module's
attribute names are the file's keys (``conv1_1.weight``, ``Mconv7_stage6_L2.bias``, ...), so
the file loads with no mapping table.

Decoding (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity Fields"):
heatmap peaks are candidate parts; each candidate limb is scored by the mean of the affinity
field projected on the limb's direction at 10 points between its ends; limbs are matched
greedily by score and chained into people; people with fewer than 4 parts or a low mean score
are dropped. The input is prepared as the released annotator does: BGR, scaled so the height is
184 px (0.5 x 368), padded to a multiple of 8 with grey, ``x / 256 - 0.5``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .pose import Person
from .weights import cached, default_device, find_weights, load_state_dict, load_strict

__all__ = ["BodyPoseNet", "decode_body", "estimate_body", "load_body_net"]

PAF_CHANNELS, HEAT_CHANNELS, FEATURES = 38, 19, 128
STRIDE = 8
BOX_SIZE, SCALE = 368, 0.5
PEAK_THRESHOLD, PAF_THRESHOLD, SAMPLES = 0.1, 0.05, 10

# The 19 limbs scored by part-affinity fields (the 17 drawn ones + two ear-shoulder links) and
# the (x, y) channel pair of each in the 38-channel PAF output.
PAF_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
    (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
PAF_INDEX = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
    (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)  # fmt: skip

_FRONT = (
    ("conv1_1", 3, 64, 3),
    ("conv1_2", 64, 64, 3),
    None,
    ("conv2_1", 64, 128, 3),
    ("conv2_2", 128, 128, 3),
    None,
    ("conv3_1", 128, 256, 3),
    ("conv3_2", 256, 256, 3),
    ("conv3_3", 256, 256, 3),
    ("conv3_4", 256, 256, 3),
    None,
    ("conv4_1", 256, 512, 3),
    ("conv4_2", 512, 512, 3),
    ("conv4_3_CPM", 512, 256, 3),
    ("conv4_4_CPM", 256, 128, 3),
)  # fmt: skip  (None = 2x2 max pool)


def _branch(stage: int, branch: int) -> list[tuple[str, int, int, int]]:
    out = PAF_CHANNELS if branch == 1 else HEAT_CHANNELS
    if stage == 1:
        return [
            (f"conv5_1_CPM_L{branch}", FEATURES, 128, 3),
            (f"conv5_2_CPM_L{branch}", 128, 128, 3),
            (f"conv5_3_CPM_L{branch}", 128, 128, 3),
            (f"conv5_4_CPM_L{branch}", 128, 512, 1),
            (f"conv5_5_CPM_L{branch}", 512, out, 1),
        ]
    cin = PAF_CHANNELS + HEAT_CHANNELS + FEATURES
    layers = [(f"Mconv1_stage{stage}_L{branch}", cin, 128, 7)]
    layers += [(f"Mconv{i}_stage{stage}_L{branch}", 128, 128, 7) for i in range(2, 6)]
    return [
        *layers,
        (f"Mconv6_stage{stage}_L{branch}", 128, 128, 1),
        (f"Mconv7_stage{stage}_L{branch}", 128, out, 1),
    ]


class BodyPoseNet(nn.Module):
    """The released COCO-18 body network. forward: (B, 3, H, W) -> (PAFs (B, 38, H/8, W/8),
    heatmaps (B, 19, H/8, W/8)); H and W multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        self._front = [spec[0] if spec else None for spec in _FRONT]
        self._branches = {(s, b): [spec[0] for spec in _branch(s, b)] for s in range(1, 7) for b in (1, 2)}
        specs = [s for s in _FRONT if s] + [spec for key in self._branches for spec in _branch(*key)]
        for name, cin, cout, k in specs:
            self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))

    def _run(self, names: list[str], x: torch.Tensor, last_relu: bool) -> torch.Tensor:
        for i, name in enumerate(names):
            x = getattr(self, name)(x)
            if i < len(names) - 1 or last_relu:
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name in self._front:
            x = F.max_pool2d(x, 2, 2) if name is None else F.relu(getattr(self, name)(x))
        features, h = x, x
        for stage in range(1, 7):
            paf = self._run(self._branches[stage, 1], h, last_relu=False)
            # The released network's no-ReLU list names Mconv7_stage6_L1 twice and omits
            # Mconv7_stage6_L2, so its final heatmaps go through a ReLU; kept for fidelity.
            heat = self._run(self._branches[stage, 2], h, last_relu=stage == 6)
            h = torch.cat([paf, heat, features], 1)
        return paf, heat


def _load(path: str, mtime: float) -> BodyPoseNet:
    with torch.device("meta"):
        net = BodyPoseNet()
    load_strict(net, load_state_dict(Path(path)), "body_pose_model.pth (OpenPose body)")
    return net.float().eval().to(default_device())


_load_cached = cached(_load)


def load_body_net(weights: str = "body_pose_model.pth") -> BodyPoseNet:
    """The body network with the user's weights (file name in the annotator folder, or a path)."""
    path = find_weights(
        weights,
        what="OpenPose body",
        get="body_pose_model.pth (lllyasviel/Annotators on the Hugging Face Hub)",
    )
    return _load_cached(path)


def _peaks(heat: np.ndarray) -> list[np.ndarray]:
    """Per part, (n, 3) rows x, y, score of the local maxima of the smoothed heatmap above 0.1."""
    out = []
    for part in range(HEAT_CHANNELS - 1):
        raw = np.ascontiguousarray(heat[:, :, part])
        s = cv2.GaussianBlur(raw, (0, 0), 3)
        p = np.pad(s, 1)
        peak = (s >= p[:-2, 1:-1]) & (s >= p[2:, 1:-1]) & (s >= p[1:-1, :-2]) & (s >= p[1:-1, 2:])
        ys, xs = np.nonzero(peak & (s > PEAK_THRESHOLD))
        out.append(np.stack([xs, ys, raw[ys, xs]], 1).astype(np.float64) if len(xs) else np.zeros((0, 3)))
    return out


def _connect(a: np.ndarray, b: np.ndarray, paf: np.ndarray, height: int) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of candidates a[i] -> b[j] by their affinity score."""
    scored = []
    for i in range(len(a)):
        for j in range(len(b)):
            vec = b[j, :2] - a[i, :2]
            norm = max(float(np.hypot(*vec)), 1e-3)
            t = np.linspace(0.0, 1.0, SAMPLES)[:, None]
            pts = np.round(a[i, :2] + t * (b[j, :2] - a[i, :2])).astype(int)
            along = paf[pts[:, 1], pts[:, 0]] @ (vec / norm)
            score = float(along.mean()) + min(0.5 * height / norm - 1.0, 0.0)  # penalise long limbs
            if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * SAMPLES and score > 0:
                scored.append((score, i, j))
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for score, i, j in sorted(scored, key=lambda c: -c[0]):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j, score))
            if len(out) >= min(len(a), len(b)):
                break
    return out


def decode_body(heatmaps: np.ndarray, pafs: np.ndarray) -> list[Person]:
    """Heatmaps (H, W, 19) and PAFs (H, W, 38) at image size -> people with COCO-18 bodies."""
    height, width = heatmaps.shape[:2]
    peaks = _peaks(heatmaps)
    offsets = np.cumsum([0] + [len(p) for p in peaks])
    cand = np.concatenate(peaks) if offsets[-1] else np.zeros((0, 3))
    # rows: 18 candidate ids (-1 = none), total score, part count
    rows: list[np.ndarray] = []
    for k, ((pa, pb), (cx, cy)) in enumerate(zip(PAF_LIMBS, PAF_INDEX)):
        if not len(peaks[pa]) or not len(peaks[pb]):
            continue
        for i, j, score in _connect(peaks[pa], peaks[pb], pafs[:, :, [cx, cy]], height):
            ia, ib = offsets[pa] + i, offsets[pb] + j
            owners = [r for r, row in enumerate(rows) if row[pa] == ia or row[pb] == ib][:2]
            if len(owners) == 2 and not np.any((rows[owners[0]][:18] >= 0) & (rows[owners[1]][:18] >= 0)):
                r1, r2 = owners  # two partial people joined by this limb: merge them
                rows[r1][:18] += rows[r2][:18] + 1
                rows[r1][18:] += rows[r2][18:]
                rows[r1][18] += score
                del rows[r2]
            elif owners:
                row = rows[owners[0]]
                if row[pb] != ib:
                    row[pb] = ib
                    row[19] += 1
                    row[18] += cand[ib, 2] + score
            elif k < 17:  # the two ear-shoulder links never start a person
                row = np.full(20, -1.0)
                row[pa], row[pb] = ia, ib
                row[18], row[19] = cand[ia, 2] + cand[ib, 2] + score, 2
                rows.append(row)
    people = []
    for row in rows:
        if row[19] < 4 or row[18] / row[19] < 0.4:
            continue
        body = np.zeros((18, 3))
        for part in range(18):
            if row[part] >= 0:
                x, y, s = cand[int(row[part])]
                body[part] = (x / width, y / height, s)
        people.append(Person(body=body))
    return people


def _prepare(image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    scale = SCALE * BOX_SIZE / image.shape[0]
    small = cv2.resize(bgr, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    h, w = small.shape[:2]
    ph, pw = -h % STRIDE, -w % STRIDE
    padded = cv2.copyMakeBorder(small, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(128, 128, 128))
    x = torch.from_numpy(padded).float().div(256.0).sub(0.5).permute(2, 0, 1)[None]
    return x, (h, w)


@torch.no_grad()
def estimate_body(image: np.ndarray, weights: str | BodyPoseNet = "body_pose_model.pth") -> list[Person]:
    """People in an HxWx3 uint8 RGB image, by the body network (a loaded one, or weights to load)."""
    net = weights if isinstance(weights, BodyPoseNet) else load_body_net(weights)
    device = next(net.parameters()).device
    x, (h, w) = _prepare(image)
    paf, heat = net(x.to(device))
    maps = torch.cat([heat, paf], 1).float()
    maps = F.interpolate(maps, scale_factor=STRIDE, mode="bicubic", align_corners=False)[:, :, :h, :w]
    maps = F.interpolate(maps, size=image.shape[:2], mode="bicubic", align_corners=False)
    maps = maps[0].permute(1, 2, 0).cpu().numpy()
    return decode_body(maps[:, :, :HEAT_CHANNELS], maps[:, :, HEAT_CHANNELS:])
