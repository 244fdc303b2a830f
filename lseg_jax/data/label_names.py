"""Label name lists of the datasets LSeg trains and evaluates on.

A dataset's mask value k (after its id -> train id mapping) means `<DATASET>_NAMES[k]`; these
strings are the text the CLIP text tower encodes.

The open-vocabulary benchmarks' lists are data files, `class_names/<list>.txt` (one class per line,
"#" lines are comments naming where the list comes from), read by `class_names`. A line may hold
several synonyms of one class, separated by ", " as the benchmark's published list writes them
(A-847: "building, edifice").
"""
import functools
import importlib.resources

# ADE20K SceneParse150, as the official LSeg code builds it from
# `label_files/ade20k_objectInfo150.txt`: the first name of each row. That file writes spaces as ";"
# too, so multi-word names are cut to their first word ("coffee" for "coffee table", "traffic" for
# "traffic light"); the released checkpoints were trained with exactly these strings.
ADE20K_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool", "pillow", "screen", "stairway", "river", "bridge", "bookcase", "blind", "coffee",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen",
    "computer", "swivel", "boat", "bar", "arcade", "hovel", "bus", "towel", "light", "truck",
    "tower", "chandelier", "awning", "streetlight", "booth", "television", "airplane", "dirt",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer", "canopy", "washer", "plaything", "swimming",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic", "tray", "ashcan", "fan",
    "pier", "crt", "plate", "monitor", "bulletin", "shower", "radiator", "glass", "clock", "flag",
)

# PASCAL VOC 2012 classes, spelt as LSeg's `label_files/fewshot_pascal.txt`.
# PASCAL-5i fold i holds classes 5i .. 5i+4.
PASCAL_VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# COCO's 80 object classes in category-id order, spelt as LSeg's
# `label_files/fewshot_coco.txt`. COCO-20i fold i holds classes i, i+4, i+8, ...
COCO_FEWSHOT_NAMES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "trafficlight", "firehydrant", "stopsign", "parkingmeter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sportsball", "kite",
    "baseballbat", "baseballglove", "skateboard", "surfboard", "tennisracket", "bottle",
    "wineglass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hotdog", "pizza", "donut", "cake", "chair", "sofa", "pottedplant", "bed",
    "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard", "cellphone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddybear", "hairdrier", "toothbrush",
)

# Cityscapes' 19 evaluated classes in train-id order (cityscapesScripts
# `labels.py`). BDD100K semantic segmentation uses the same 19 train ids.
CITYSCAPES_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
BDD100K_NAMES = CITYSCAPES_NAMES

# IDD (India Driving Dataset) level-3 ids, the 26-class benchmark level: for each level3Id the name
# of the first AutoNUE `anue_labels.py` label carrying it (e.g. id 4 "person" also covers "animal").
IDD_LEVEL3_NAMES = (
    "road", "drivable fallback", "sidewalk", "non-drivable fallback", "person", "rider",
    "motorcycle", "bicycle", "autorickshaw", "car", "truck", "bus", "vehicle fallback", "curb",
    "wall", "fence", "guard rail", "billboard", "traffic sign", "traffic light", "pole",
    "obs-str-bar-fallback", "building", "bridge", "vegetation", "sky",
)

# Mapillary Vistas v1.2: the "readable" names of `config.json`'s 65 labels (the 66th, "Unlabeled",
# is ignored), lower-cased so that they merge with the other datasets' names in a mixture's label
# table.
MAPILLARY_VISTAS_NAMES = (
    "bird", "ground animal", "curb", "fence", "guard rail", "barrier", "wall", "bike lane",
    "crosswalk - plain", "curb cut", "parking", "pedestrian area", "rail track", "road",
    "service lane", "sidewalk", "bridge", "building", "tunnel", "person", "bicyclist",
    "motorcyclist", "other rider", "lane marking - crosswalk", "lane marking - general", "mountain",
    "sand", "sky", "snow", "terrain", "vegetation", "water", "banner", "bench", "bike rack",
    "billboard", "catch basin", "cctv camera", "fire hydrant", "junction box", "mailbox", "manhole",
    "phone booth", "pothole", "street light", "pole", "traffic sign frame", "utility pole",
    "traffic light", "traffic sign (back)", "traffic sign (front)", "trash can", "bicycle", "boat",
    "bus", "car", "caravan", "motorcycle", "on rails", "other vehicle", "trailer", "truck",
    "wheeled slow", "car mount", "ego vehicle",
)

# COCO panoptic 2017: the 133 categories of `panoptic_coco_categories.json`
# (80 things, then 53 stuff) in category-id order.
COCO_PANOPTIC_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "bridge", "cardboard", "counter",
    "curtain", "door-stuff", "floor-wood", "flower", "fruit", "gravel", "house", "light",
    "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river", "road",
    "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "window-blind", "window-other", "tree-merged",
    "fence-merged", "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged",
    "floor-other-merged", "pavement-merged", "mountain-merged", "grass-merged", "dirt-merged",
    "paper-merged", "food-other-merged", "building-other-merged", "rock-merged",
    "wall-other-merged", "rug-merged",
)

# SUN RGB-D 37-class segmentation (`seg37list` of the SUN RGB-D toolbox,
# underscores written as spaces); label value k + 1 in the PNGs is class k.
SUNRGBD_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "fridge", "tv", "paper", "towel", "shower curtain",
    "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag",
)


@functools.cache
def class_names(name: str) -> tuple[str, ...]:
  """The class list `class_names/<name>.txt` shipped with the package."""
  text = importlib.resources.files(__package__).joinpath(
      f"class_names/{name}.txt").read_text(encoding="utf-8")
  return tuple(line.strip() for line in text.splitlines()
               if line.strip() and not line.startswith("#"))


_VOC_BACKGROUND = (*class_names("voc20"), "background")

# Label names of every fixed-label-set source, by registry name.
DATASET_LABEL_NAMES = {
    "a150": class_names("a150"),
    "a847": class_names("a847"),
    "pc459": class_names("pc459"),
    "pc59": class_names("pc59"),
    "pas20": class_names("voc20"),
    "pas21": _VOC_BACKGROUND,  # Background is class 20, as the prepared maps store it.
    "pas20b": _VOC_BACKGROUND,
    "ade20k": ADE20K_NAMES,
    "bdd100k": BDD100K_NAMES,
    "cityscapes": CITYSCAPES_NAMES,
    "coco_panoptic": COCO_PANOPTIC_NAMES,
    "idd": IDD_LEVEL3_NAMES,
    "mapillary_vistas": MAPILLARY_VISTAS_NAMES,
    "sunrgbd": SUNRGBD_NAMES,
}
