"""Segmentation colour palettes: ADE20K (150 classes) and COCO panoptic (133 classes).

Facts for compatibility: the seg models were trained on label maps coloured with these palettes
(ADE20K: the palette of the mmsegmentation ADE20K dataset, which the released UniFormer annotator
used; COCO: the detectron2 COCO panoptic category colours, used by the v1.1 OneFormer COCO
annotator). Class i is drawn in ``PALETTES[name][i]``.

Two ADE20K classes share a colour (road and skyscraper are both (140, 140, 140)), so a coloured
map cannot tell them apart; :func:`controlnet.annotators.segmentation.colors_to_labels` gives
the lower index.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ADE20K_CLASSES", "COCO_CLASSES", "PALETTES"]

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base",
    "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

_ADE20K = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

# (name, colour) of the 133 COCO panoptic categories in contiguous order (80 things, 53 stuff).
_COCO = (
    ("person", (220, 20, 60)), ("bicycle", (119, 11, 32)), ("car", (0, 0, 142)),
    ("motorcycle", (0, 0, 230)), ("airplane", (106, 0, 228)), ("bus", (0, 60, 100)),
    ("train", (0, 80, 100)), ("truck", (0, 0, 70)), ("boat", (0, 0, 192)),
    ("traffic light", (250, 170, 30)), ("fire hydrant", (100, 170, 30)), ("stop sign", (220, 220, 0)),
    ("parking meter", (175, 116, 175)), ("bench", (250, 0, 30)), ("bird", (165, 42, 42)),
    ("cat", (255, 77, 255)), ("dog", (0, 226, 252)), ("horse", (182, 182, 255)),
    ("sheep", (0, 82, 0)), ("cow", (120, 166, 157)), ("elephant", (110, 76, 0)),
    ("bear", (174, 57, 255)), ("zebra", (199, 100, 0)), ("giraffe", (72, 0, 118)),
    ("backpack", (255, 179, 240)), ("umbrella", (0, 125, 92)), ("handbag", (209, 0, 151)),
    ("tie", (188, 208, 182)), ("suitcase", (0, 220, 176)), ("frisbee", (255, 99, 164)),
    ("skis", (92, 0, 73)), ("snowboard", (133, 129, 255)), ("sports ball", (78, 180, 255)),
    ("kite", (0, 228, 0)), ("baseball bat", (174, 255, 243)), ("baseball glove", (45, 89, 255)),
    ("skateboard", (134, 134, 103)), ("surfboard", (145, 148, 174)), ("tennis racket", (255, 208, 186)),
    ("bottle", (197, 226, 255)), ("wine glass", (171, 134, 1)), ("cup", (109, 63, 54)),
    ("fork", (207, 138, 255)), ("knife", (151, 0, 95)), ("spoon", (9, 80, 61)),
    ("bowl", (84, 105, 51)), ("banana", (74, 65, 105)), ("apple", (166, 196, 102)),
    ("sandwich", (208, 195, 210)), ("orange", (255, 109, 65)), ("broccoli", (0, 143, 149)),
    ("carrot", (179, 0, 194)), ("hot dog", (209, 99, 106)), ("pizza", (5, 121, 0)),
    ("donut", (227, 255, 205)), ("cake", (147, 186, 208)), ("chair", (153, 69, 1)),
    ("couch", (3, 95, 161)), ("potted plant", (163, 255, 0)), ("bed", (119, 0, 170)),
    ("dining table", (0, 182, 199)), ("toilet", (0, 165, 120)), ("tv", (183, 130, 88)),
    ("laptop", (95, 32, 0)), ("mouse", (130, 114, 135)), ("remote", (110, 129, 133)),
    ("keyboard", (166, 74, 118)), ("cell phone", (219, 142, 185)), ("microwave", (79, 210, 114)),
    ("oven", (178, 90, 62)), ("toaster", (65, 70, 15)), ("sink", (127, 167, 115)),
    ("refrigerator", (59, 105, 106)), ("book", (142, 108, 45)), ("clock", (196, 172, 0)),
    ("vase", (95, 54, 80)), ("scissors", (128, 76, 255)), ("teddy bear", (201, 57, 1)),
    ("hair drier", (246, 0, 122)), ("toothbrush", (191, 162, 208)), ("banner", (255, 255, 128)),
    ("blanket", (147, 211, 203)), ("bridge", (150, 100, 100)), ("cardboard", (168, 171, 172)),
    ("counter", (146, 112, 198)), ("curtain", (210, 170, 100)), ("door-stuff", (92, 136, 89)),
    ("floor-wood", (218, 88, 184)), ("flower", (241, 129, 0)), ("fruit", (217, 17, 255)),
    ("gravel", (124, 74, 181)), ("house", (70, 70, 70)), ("light", (255, 228, 255)),
    ("mirror-stuff", (154, 208, 0)), ("net", (193, 0, 92)), ("pillow", (76, 91, 113)),
    ("platform", (255, 180, 195)), ("playingfield", (106, 154, 176)), ("railroad", (230, 150, 140)),
    ("river", (60, 143, 255)), ("road", (128, 64, 128)), ("roof", (92, 82, 55)),
    ("sand", (254, 212, 124)), ("sea", (73, 77, 174)), ("shelf", (255, 160, 98)),
    ("snow", (255, 255, 255)), ("stairs", (104, 84, 109)), ("tent", (169, 164, 131)),
    ("towel", (225, 199, 255)), ("wall-brick", (137, 54, 74)), ("wall-stone", (135, 158, 223)),
    ("wall-tile", (7, 246, 231)), ("wall-wood", (107, 255, 200)), ("water-other", (58, 41, 149)),
    ("window-blind", (183, 121, 142)), ("window-other", (255, 73, 97)), ("tree-merged", (107, 142, 35)),
    ("fence-merged", (190, 153, 153)), ("ceiling-merged", (146, 139, 141)),
    ("sky-other-merged", (70, 130, 180)), ("cabinet-merged", (134, 199, 156)),
    ("table-merged", (209, 226, 140)), ("floor-other-merged", (96, 36, 108)),
    ("pavement-merged", (96, 96, 96)), ("mountain-merged", (64, 170, 64)),
    ("grass-merged", (152, 251, 152)), ("dirt-merged", (208, 229, 228)),
    ("paper-merged", (206, 186, 171)), ("food-other-merged", (152, 161, 64)),
    ("building-other-merged", (116, 112, 0)), ("rock-merged", (0, 114, 143)),
    ("wall-other-merged", (102, 102, 156)), ("rug-merged", (250, 141, 255)),
)  # fmt: skip

COCO_CLASSES: tuple[str, ...] = tuple(name for name, _ in _COCO)

#: name -> (N, 3) uint8 RGB palette, row i = colour of class i.
PALETTES: dict[str, np.ndarray] = {
    "ade20k": np.array(_ADE20K, np.uint8),
    "coco": np.array([c for _, c in _COCO], np.uint8),
}
for _p in PALETTES.values():
    _p.flags.writeable = False
