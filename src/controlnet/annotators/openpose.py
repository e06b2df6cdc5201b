"""The OpenPose annotator: the released body network's keypoints (:mod:`.pose_net`), drawn as the
v1.1 models read them (:mod:`.pose`)."""

from __future__ import annotations

import numpy as np

from .pose import draw_pose
from .registry import Annotator, Param, ParamType


def openpose(image: np.ndarray, weights: str = "body_pose_model.pth") -> np.ndarray:
    """HxWx3 uint8 photo -> HxWx3 uint8 OpenPose body map (learned estimator, user weights)."""
    from .pose_net import estimate_body

    people = estimate_body(image, weights)
    return draw_pose(people, image.shape[0], image.shape[1])


ENTRIES = (
    Annotator(
        name="openpose",
        description="OpenPose body keypoints (COCO-18) by the released body network, drawn as v1.1 does",
        fn=openpose,
        params=(
            Param(
                "weights",
                ParamType.STR,
                "body_pose_model.pth",
                "body_pose_model.pth (lllyasviel/Annotators): file name in the annotator folder, or a path",
            ),
        ),
        needs_weights=True,
        nearest=True,
    ),
)
