"""Input pipelines: contract, determinism, host slices, resume, mixing, ops."""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from lseg_jax.data import IGNORE_INDEX
from lseg_jax.data import input_pipeline as ip
from lseg_jax.data import preprocess
from lseg_jax.data import registry
from lseg_jax.data import synthetic
from lseg_jax.data import train_stream

SYNTH = dict(height=32, width=48, num_train=20, num_validation=7, seed=1)
CONST_LABELS = ["background", "sky", "cat"]
EPISODE_CLASSES = ["aeroplane", "bicycle", "bird"]


class ConstSource(registry.Source):
  """Example i: a flat image of grey value 5 + 2i (so batches reveal i)."""

  def __init__(self, num_examples, label_names=CONST_LABELS):
    self.num_examples = num_examples
    self.label_names = list(label_names)

  def load(self, index):
    i = tf.cast(index, tf.int32)
    h, w = 20 + (i % 3) * 7, 30 - (i % 2) * 9
    value = tf.cast(5 + 2 * i, tf.uint8)
    return {"image": tf.fill([h, w, 3], value),
            "mask": tf.fill([h, w], i % len(self.label_names)),
            "file_name": tf.strings.as_string(index)}


class EpisodeSource(ConstSource):
  """Binary masks of class `i % 3`: top rows 1, the rest 0, one ignore row."""

  def __init__(self, num_examples):
    super().__init__(num_examples, ["other", "object"])
    self.class_names = list(EPISODE_CLASSES)

  def load(self, index):
    ex = super().load(index)
    h, w = tf.shape(ex["mask"])[0], tf.shape(ex["mask"])[1]
    rows = tf.range(h)[:, None] + tf.zeros([1, w], tf.int32)
    mask = tf.where(rows < h // 2, 1, 0)
    mask = tf.where(rows == h - 1, IGNORE_INDEX, mask)
    ci = tf.cast(index % 3, tf.int32)
    return dict(ex, mask=mask, class_index=ci,
                class_name=tf.gather(tf.constant(EPISODE_CLASSES), ci))


registry.register("test_const")(
    lambda split, num_examples=10, **kw: ConstSource(num_examples))
registry.register("test_episodes", episodic=True)(
    lambda split, num_examples=9, **kw: EpisodeSource(num_examples))


def _cfg(**overrides):
  cfg = ip.default_data_config()
  cfg.update({**dict(name="test_const", crop_size=16, base_size=24,
                     num_parallel_calls=2), **overrides})
  return cfg


def _ids(batch):
  """Example ids of a ConstSource batch (grey value of a labelled pixel)."""
  ids = []
  for image, label in zip(batch["image"], batch["label"]):
    grey = (image[label != IGNORE_INDEX] + 1) * 127.5
    values = np.unique(np.round(grey))
    assert len(values) == 1, values
    ids.append(int(values[0] - 5) // 2)
  return ids


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  synthetic.build(path, **SYNTH)
  return path


def _synth_cfg(synth_dir, **overrides):
  return _cfg(name="synthetic", data_dir=synth_dir,
              source_kwargs=dict(SYNTH), **overrides)


def test_train_batch_contract_on_synthetic(synth_dir):
  cfg = _synth_cfg(synth_dir)
  assert ip.label_table(cfg) == list(synthetic.LABEL_NAMES)
  it = ip.make_train_iterator(cfg, global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
  assert it.label_names == list(synthetic.LABEL_NAMES)
  for batch in _take(it, 3):
    assert set(batch) == {"image", "label", "label_mask"}
    assert batch["image"].dtype == np.float32
    assert batch["image"].shape == (8, 16, 16, 3)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == np.int32
    assert batch["label"].shape == (8, 16, 16)
    assert batch["label"].min() >= IGNORE_INDEX
    assert batch["label"].max() < len(synthetic.LABEL_NAMES)
    assert batch["label_mask"].dtype == bool
    assert batch["label_mask"].shape == (8, 6) and batch["label_mask"].all()
  assert (batch["label"] == IGNORE_INDEX).any()


def test_same_seed_same_batches_other_seed_differs():
  make = lambda seed: ip.make_train_iterator(
      _cfg(), global_batch_size=4, seed=seed, process_index=0, process_count=1)
  a, b, c = _take(make(7), 4), _take(make(7), 4), _take(make(8), 4)
  _assert_same(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_epochs_are_permutations_reshuffled_each_epoch():
  it = ip.make_train_iterator(_cfg(), global_batch_size=5, seed=0,
                              process_index=0, process_count=1)
  ids = [i for b in _take(it, 4) for i in _ids(b)]
  epoch0, epoch1 = ids[:10], ids[10:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(10))
  assert epoch0 != epoch1


def test_processes_read_disjoint_slices():
  per_process = []
  for index in range(3):
    it = ip.make_train_iterator(_cfg(source_kwargs={"num_examples": 12}),
                                global_batch_size=6, seed=0,
                                process_index=index, process_count=3)
    assert it.batch_size == 2
    per_process.append({i for b in _take(it, 2) for i in _ids(b)})
  assert all(len(s) == 4 for s in per_process)
  assert set.union(*per_process) == set(range(12))


def _join_processes(cfg, count, steps, *, global_batch_size, seed=0, start_step=0):
  """The batches of `count` processes, joined in process order per step."""
  per_process = [_take(ip.make_train_iterator(
      cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=i, process_count=count), steps) for i in range(count)]
  return [{k: np.concatenate([p[s][k] for p in per_process]) for k in per_process[0][s]}
          for s in range(steps)]


@pytest.mark.parametrize("mixture", [False, True])
def test_global_batch_is_the_same_for_any_process_count(synth_dir, mixture):
  # The global batch of step s depends on (seed, s) alone: the rows of 2 or 4
  # processes, joined, are the 1-process batch, also after a resume (start_step).
  cfg = _cfg()
  if mixture:
    cfg = _cfg(name="mix", data_dir=synth_dir, mixture=[
        dict(name="synthetic", weight=1.0, **SYNTH),
        dict(name="test_const", weight=2.0, num_examples=6)])
  single = _take(ip.make_train_iterator(cfg, global_batch_size=4, seed=2,
                                        process_index=0, process_count=1), 6)
  for count in (2, 4):
    _assert_same(_join_processes(cfg, count, 4, global_batch_size=4, seed=2), single[:4])
  _assert_same(_join_processes(cfg, 2, 2, global_batch_size=4, seed=2, start_step=4),
               single[4:6])


def test_resume_equals_uninterrupted_stream():
  # 10 examples, batch 4: steps 2 and 5 straddle epoch boundaries.
  make = lambda start: ip.make_train_iterator(
      _cfg(), global_batch_size=4, seed=3, start_step=start, process_index=0,
      process_count=1)
  full = _take(make(0), 7)
  for start in (2, 5):
    _assert_same(_take(make(start), 2), full[start:start + 2])


def test_resume_mixture_equals_uninterrupted_stream(synth_dir):
  cfg = _cfg(name="mix", data_dir=synth_dir, mixture=[
      dict(name="synthetic", weight=1.0, **SYNTH),
      dict(name="test_const", weight=2.0, num_examples=6)])
  make = lambda start: ip.make_train_iterator(
      cfg, global_batch_size=3, seed=0, start_step=start, process_index=0,
      process_count=1)
  full = _take(make(0), 6)
  _assert_same(_take(make(4), 2), full[4:6])


def test_mixture_union_table_and_label_masks(synth_dir):
  cfg = _cfg(name="mix", data_dir=synth_dir, mixture=[
      dict(name="synthetic", weight=1.0, **SYNTH),
      dict(name="test_const", weight=1.0)])
  union = list(synthetic.LABEL_NAMES) + ["sky", "cat"]
  assert ip.label_table(cfg) == union
  synth_row = np.arange(8) < 6
  const_row = np.isin(np.arange(8), [0, 6, 7])
  it = ip.make_train_iterator(cfg, global_batch_size=8, seed=1,
                              process_index=0, process_count=1)
  rows = []
  for batch in _take(it, 3):
    for mask, label in zip(batch["label_mask"], batch["label"]):
      assert (np.array_equal(mask, synth_row)
              or np.array_equal(mask, const_row)), mask
      present = np.unique(label[label != IGNORE_INDEX])
      assert mask[present].all(), (mask, present)
      rows.append(np.array_equal(mask, const_row))
  assert 0 < sum(rows) < len(rows)  # Both datasets are sampled.


def test_mixture_weights_set_proportions():
  cfg = _cfg(name="mix", mixture=[
      dict(name="test_const", weight=3.0),
      dict(name="test_const", weight=1.0, num_examples=4, split="other")])
  choices = train_stream._mixture_choices([3.0, 1.0], seed=0)
  counts = train_stream._mixture_counts(choices, 2, 4000)
  assert abs(counts[0] / 4000 - 0.75) < 0.03
  assert ip.label_table(cfg) == CONST_LABELS


def test_episodes_table_and_label_masks():
  cfg = _cfg(name="test_episodes")
  assert ip.label_table(cfg) == ["other", *EPISODE_CLASSES]
  it = ip.make_train_iterator(cfg, global_batch_size=6, seed=0,
                              process_index=0, process_count=1)
  batch = next(it)
  for image, mask, label in zip(batch["image"], batch["label_mask"],
                                batch["label"]):
    assert mask.sum() == 2 and mask[0]
    cls = int(np.flatnonzero(mask)[1])
    example = int(round((image[label != IGNORE_INDEX][0, 0] + 1) * 127.5 - 5))
    assert cls == 1 + (example // 2) % 3
    assert set(np.unique(label)) <= {IGNORE_INDEX, 0, cls}


def test_the_source_spec_says_whether_it_is_episodic(synth_dir):
  episodes, fixed = _cfg(name="test_episodes"), _cfg()
  mix = _cfg(name="mix", mixture=[dict(name="test_const"),
                                   dict(name="test_episodes")])
  assert ip.is_episodic(episodes) and ip.is_episodic(mix)
  assert not ip.is_episodic(fixed)
  assert not ip.is_episodic(_synth_cfg(synth_dir))
  for name in ("pascal5i", "coco20i", "fss1000"):  # Nothing built: no data.
    assert ip.is_episodic(_cfg(name=name, data_dir="/nonexistent"))
  for name in ("ade20k", "cityscapes", "folder", "synthetic"):
    assert not ip.is_episodic(_cfg(name=name))
  assert ip.is_episodic({"name": "pascal5i"})  # A partial config will do.
  for cfg, episodic in ((episodes, True), (fixed, False)):
    train = ip.make_train_iterator(cfg, global_batch_size=2, seed=0,
                                   process_index=0, process_count=1)
    ev = ip.make_eval_iterator(cfg, batch_size=2, process_index=0,
                               process_count=1)
    assert train.episodic is ev.episodic is episodic
    assert ("class_index" in next(ev)) is episodic
  with pytest.raises(ValueError, match="Unknown dataset source 'nope'"):
    ip.is_episodic(_cfg(name="nope"))


def test_the_registration_alone_says_whether_a_source_is_episodic():
  registry.register("test_unflagged_episodes")(
      lambda split, **kw: EpisodeSource(3))
  assert not registry.get_source("test_unflagged_episodes", "train").is_episodic
  assert registry.get_source("test_episodes", "train").is_episodic
  # Unflagged, the same source reads as fixed labels: its own table, no episodes.
  assert ip.label_table(_cfg(name="test_unflagged_episodes")) == ["other", "object"]
  assert not ip.is_episodic(_cfg(name="test_unflagged_episodes"))


def test_eval_one_pass_padded_and_split_over_processes():
  seen, num_batches = [], set()
  for index in range(2):
    it = ip.make_eval_iterator(_cfg(eval_pad_to=(40, 40)), batch_size=4,
                               process_index=index, process_count=2)
    batches = list(it)
    num_batches.add(len(batches))
    assert it.num_batches == len(batches) == 2
    for b in batches:
      assert b["image"].shape == (4, 40, 40, 3)
      assert b["valid"].dtype == bool and b["image_size"].dtype == np.int32
      for valid, size, label, image in zip(b["valid"], b["image_size"],
                                           b["label"], b["image"]):
        if not valid:
          assert (label == IGNORE_INDEX).all()
          continue
        h, w = size
        assert (label[:h, :w] != IGNORE_INDEX).all()
        assert (label[h:] == IGNORE_INDEX).all()
        assert (label[:, w:] == IGNORE_INDEX).all()
        seen.append(int(round((image[0, 0, 0] + 1) * 127.5 - 5)) // 2)
  assert len(num_batches) == 1
  assert sorted(seen) == list(range(10))
  # Fixed order: a second pass is identical.
  again = list(ip.make_eval_iterator(_cfg(eval_pad_to=(40, 40)), batch_size=4,
                                     process_index=0, process_count=2))
  _assert_same(again, list(ip.make_eval_iterator(
      _cfg(eval_pad_to=(40, 40)), batch_size=4, process_index=0,
      process_count=2)))


@pytest.mark.parametrize("mode,shape", [("center_crop", (16, 16)),
                                        ("long_side", (24, 24))])
def test_eval_resize_modes(mode, shape):
  it = ip.make_eval_iterator(_cfg(eval_resize=mode), batch_size=3,
                             process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (3, *shape, 3)
  assert batch["label"].shape == (3, *shape)


def test_eval_episodes_carry_class_index():
  it = ip.make_eval_iterator(_cfg(name="test_episodes"), batch_size=4,
                             process_index=0, process_count=1)
  batches = list(it)
  class_index = np.concatenate([b["class_index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(class_index[valid], np.arange(9) % 3)
  assert batches[-1]["label_mask"][~batches[-1]["valid"]].all()


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match="on_bad_example='ignore'"):
    ip.make_train_iterator(_cfg(on_bad_example="ignore"), global_batch_size=2,
                           seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="global_batch_size=5"):
    ip.make_train_iterator(_cfg(), global_batch_size=5, seed=0,
                           process_index=0, process_count=2)
  with pytest.raises(ValueError, match="eval_resize='bogus'"):
    ip.make_eval_iterator(_cfg(eval_resize="bogus"), batch_size=2,
                          process_index=0, process_count=1)
  with pytest.raises(ValueError, match="Unknown dataset source 'nope'"):
    ip.label_table(_cfg(name="nope"))
  with pytest.raises(ValueError, match="mixture"):
    ip.label_table(_cfg(name="mix"))


def test_out_of_range_mask_value_is_an_error_naming_file_and_value():
  class Bad(ConstSource):
    def load(self, index):
      ex = super().load(index)
      return dict(ex, mask=ex["mask"] + 5 * tf.cast(index == 3, tf.int32))
  registry.register("test_bad_range")(lambda split, **kw: Bad(6))
  for on_bad in ("error", "skip"):
    it = ip.make_train_iterator(
        _cfg(name="test_bad_range", on_bad_example=on_bad),
        global_batch_size=6, seed=0, process_index=0, process_count=1)
    with pytest.raises(ip.BadExampleError, match=r"'3'.*value 5 outside"):
      next(it)


# ---------------------------------------------------------------------------
# Preprocessing ops against PIL (the reference implementation's library).
# ---------------------------------------------------------------------------
def test_mask_resize_is_pil_nearest():
  mask = np.random.default_rng(0).integers(0, 150, (37, 53)).astype(np.uint8)
  # (32, 49) from 45x70 has exact ties, where PIL's rounding matters.
  for size in [(20, 29), (74, 106), (100, 60), (11, 7), (32, 49), (520, 700)]:
    ref = np.array(Image.fromarray(mask).resize(size[::-1], Image.NEAREST))
    out = preprocess.resize_nearest(tf.constant(mask, tf.int32), size)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_image_resize_is_pil_bicubic():
  image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
  for size in [(20, 29), (74, 106), (100, 60), (37, 53)]:
    ref = np.array(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
    out = preprocess.resize_image(tf.constant(image), size).numpy()
    np.testing.assert_array_equal(out, ref)


def test_resize_window_equals_full_resize_then_slice():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), np.uint8)
  mask = rng.integers(0, 9, (37, 53)).astype(np.int32)
  for size, offset, window in [((74, 106), (3, 5), (10, 12)),
                               ((20, 29), (13, 20), (7, 9)),
                               ((100, 60), (0, 0), (100, 60))]:
    crop = (slice(offset[0], offset[0] + window[0]),
            slice(offset[1], offset[1] + window[1]))
    full = preprocess.resize_image(tf.constant(image), size).numpy()
    part = preprocess.resize_image(tf.constant(image), size, offset, window)
    np.testing.assert_array_equal(part.numpy(), full[crop])
    full = preprocess.resize_nearest(tf.constant(mask), size).numpy()
    part = preprocess.resize_nearest(tf.constant(mask), size, offset, window)
    np.testing.assert_array_equal(part.numpy(), full[crop])


def test_train_augment_geometry():
  """Long side in [0.5, 2] * base, pad with ignore, crop, flip keeps pairs."""
  h, w = 30, 50
  image = np.zeros((h, w, 3), np.uint8)
  image[:, :, 0] = np.arange(w)[None] * 5  # Red encodes the column.
  mask = np.tile(np.arange(w, dtype=np.int32)[None], (h, 1)) % 7
  for s in range(20):
    out_image, out_mask = preprocess.train_augment(
        tf.constant(image), tf.constant(mask), tf.constant([s, 1], tf.int64),
        crop_size=32, base_size=40)
    out_image, out_mask = out_image.numpy(), out_mask.numpy()
    assert out_image.shape == (32, 32, 3) and out_mask.shape == (32, 32)
    padded = out_mask == IGNORE_INDEX
    # Padding is black (normalised -1) and only at the bottom/right.
    assert (out_image[padded] == -1).all()
    assert set(np.unique(out_mask[~padded])) <= set(range(7))


def test_center_crop_eval_matches_reference_geometry():
  image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), np.uint8)
  mask = np.random.default_rng(2).integers(0, 9, (45, 70)).astype(np.int32)
  out_image, out_mask = preprocess.eval_preprocess(
      tf.constant(image), tf.constant(mask), mode="center_crop", crop_size=32)
  # Reference: short side 32, other int(70 * 32 / 45) = 49, offset
  # round((49 - 32) / 2) = round(8.5) = 8 (half to even).
  ref_mask = np.array(Image.fromarray(mask.astype(np.uint8)).resize(
      (49, 32), Image.NEAREST))[:, 8:40]
  np.testing.assert_array_equal(out_mask.numpy(), ref_mask)
  ref_image = np.array(Image.fromarray(image).resize((49, 32), Image.BICUBIC))
  ref_image = ref_image[:, 8:40] / 127.5 - 1
  assert np.abs(out_image.numpy() - ref_image).max() <= 1 / 127.5 + 1e-6


def test_long_side_sizes_match_reference_formula():
  for h, w, long in [(512, 683, 520), (683, 512, 300), (100, 100, 57),
                     (333, 517, 1040)]:
    oh, ow = preprocess._long_side_size(h, w, long)
    if h > w:
      ref = (long, int(1.0 * w * long / h + 0.5))
    else:
      ref = (int(1.0 * h * long / w + 0.5), long)
    assert (int(oh), int(ow)) == ref


# ---------------------------------------------------------------------------
# Host batches -> global arrays.
# ---------------------------------------------------------------------------
def test_to_global_and_prefetch_to_device():
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  it = ip.make_train_iterator(_cfg(), global_batch_size=8, seed=0,
                              process_index=0, process_count=1)
  ref = _take(ip.make_train_iterator(_cfg(), global_batch_size=8, seed=0,
                                     process_index=0, process_count=1), 3)
  out = list(zip(range(3), ip.prefetch_to_device(it, 2, sharding)))
  for (_, batch), expected in zip(out, ref):
    assert batch["image"].sharding == sharding
    assert batch["label_mask"].shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(batch["label"]),
                                  expected["label"])


def test_default_config_is_the_declared_fields():
  cfg = ip.default_data_config()
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert list(cfg) == sorted(ip.FIELDS) and "`FIELDS`" in ip.__doc__
