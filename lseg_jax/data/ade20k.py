"""ADE20K SceneParse150 (150 classes), the benchmark LSeg trains and evaluates on.

  source = registry.get_source("ade20k", "validation", data_dir=DIR)

Read from the official ADEChallengeData2016.zip, in place or extracted; stored value 0 ("other") is
ignored and value k is class k - 1 (`label_names.ADE20K_NAMES`). TFDS's `scene_parse150` is not a
way into ADE20K: it is built from the 2017 Places challenge's instance annotations (100 classes in
the red channel), not the 150-class semantic masks that LSeg trains and evaluates on.
"""
from __future__ import annotations

import functools

import numpy as np

from lseg_jax.data import registry
from lseg_jax.data.dataset_layouts import Layout, MixtureDataset, TRAINING_VALIDATION, Tree
from lseg_jax.data.dataset_layouts import make_source, renamed
from lseg_jax.data.label_names import ADE20K_NAMES

ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"

ADE20K = MixtureDataset(
    name="ade20k", title="ADE20K", splits=TRAINING_VALIDATION,
    expected=(
        f"the official ADEChallengeData2016.zip ({ADE20K_URL}) at "
        "{d}/ADEChallengeData2016.zip, or extracted so that "
        "{d}/ADEChallengeData2016/images/training/*.jpg and "
        "{d}/ADEChallengeData2016/annotations/training/*.png exist."),
    layouts=(Layout(
        Tree("annotations", ("ADEChallengeData2016",),
             ("ADEChallengeData2016.zip",)), None,
        "images/{split}/*.jpg", "annotations/{split}/*.png",
        renamed(r"^images/(.*)\.jpg$", r"annotations/\1.png")),),
    # Stored value 0 = "other" -> ignore; k -> class k - 1.
    value_table=np.arange(-1, len(ADE20K_NAMES)))

registry.register(ADE20K.name)(functools.partial(make_source, ADE20K))
