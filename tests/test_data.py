import numpy as np
import pytest

from onnxcompress import Dataset, InputError, as_dataset, load_dataset


def test_npz_with_labels(tmp_path):
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 2), np.float32), labels=np.arange(4))
    ds = load_dataset(str(tmp_path / "d.npz"), ["input"])
    assert len(ds) == 4 and ds.labels.tolist() == [0, 1, 2, 3]
    assert [b["input"].shape[0] for b in ds.batches(3)] == [3, 1]


def test_npy_folder_for_single_input(tmp_path):
    np.save(tmp_path / "0.npy", np.zeros((2, 5), np.float32))
    np.save(tmp_path / "1.npy", np.ones((1, 5), np.float32))
    ds = load_dataset(str(tmp_path), ["x"])
    assert ds.feeds["x"].shape == (3, 5) and ds.labels is None


def test_wrong_input_names_are_reported(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 2)))
    with pytest.raises(InputError, match=r"missing \['input'\], unexpected \['images'\]"):
        load_dataset(str(tmp_path / "d.npz"), ["input"])


def test_label_count_mismatch():
    with pytest.raises(InputError, match="3 labels for 2 samples"):
        Dataset({"x": np.zeros((2, 1))}, np.arange(3))


def test_iterable_of_feeds_and_calibration_reader():
    feeds = [{"x": np.full((2, 3), i, np.float32)} for i in range(3)]
    assert as_dataset(feeds, ["x"]).feeds["x"].shape == (6, 3)

    class Reader:  # the onnxruntime CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    ds = as_dataset(Reader(), ["x"])
    assert ds.feeds["x"][:, 0].tolist() == [0, 0, 1, 1, 2, 2] and ds.layout == "batch"
    # feeds that do not join as batches (a scalar input, lines of different widths) stay whole
    odd = as_dataset([{"x": np.ones((1, w), np.float32), "t": np.float32(w)} for w in (3, 5)], ["x", "t"])
    assert odd.layout == "feeds" and [(f["x"].shape, float(f["t"])) for f in odd.batches(64)] == [((1, 3), 3.0), ((1, 5), 5.0)]


def test_conform_casts_floats_and_checks_static_dims(resnet):
    from onnxcompress.data import conform
    ds = conform(Dataset({"input": np.zeros((2, 1, 28, 28), np.float64)}), resnet)
    assert ds.feeds["input"].dtype == np.float32
    with pytest.raises(InputError, match=r"has shape \[2, 3, 28, 28\]; the model expects \['\?', 1, 28, 28\]"):
        conform(Dataset({"input": np.zeros((2, 3, 28, 28), np.float32)}), resnet)


def test_a_scalar_array_is_refused_with_the_input_named(tmp_path):
    """A 0-d array (an input without a batch axis) has no samples: a one-line InputError, not a
    TypeError from len()."""
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), temperature=np.array(2.0, np.float32))
    with pytest.raises(InputError, match="'temperature' is a scalar .* fed with the feeds layout"):
        load_dataset(str(tmp_path / "d.npz"), ["x", "temperature"])


def test_an_npz_declaring_the_feeds_layout_is_fed_one_complete_feed_at_a_time(tmp_path):
    """Axis 0 indexes feeds: each is handed over as it is (a scalar as a 0-d array), whatever batch
    size is asked; take and split keep the layout; feed_shapes are a feed's own."""
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 2), np.float32), t=np.arange(5, dtype=np.float32),
             __layout__=np.asarray("feeds"))
    ds = load_dataset(str(tmp_path / "d.npz"), ["x", "t"])
    assert ds.layout == "feeds" and len(ds) == 5 and ds.n_batches(64) == 5
    feeds = list(ds.batches(64))
    assert [f["x"].shape for f in feeds] == [(3, 2)] * 5 and [f["t"].shape for f in feeds] == [()] * 5
    assert float(feeds[2]["t"]) == 2.0 and ds.feed_shapes() == {"x": [3, 2], "t": []}
    first, rest = ds.split(2)
    assert (len(first), len(rest), first.layout, ds.take(3).layout) == (2, 3, "feeds", "feeds")
    assert ds.rows("x").shape == (15, 2)          # joined as the outputs of 5 runs are


def test_a_folder_of_feeds_of_different_shapes_with_layout_feeds(tmp_path):
    """One .npz per feed (text lines of different widths, say): stacked as feeds, never
    concatenated; conform checks each feed against the model's input."""
    import onnx
    from onnx import helper
    from onnxcompress.data import conform
    for i, width in enumerate((7, 9, 12)):
        np.savez(tmp_path / f"{i}.npz", x=np.ones((1, 3, width), np.float64) * i)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, "W"])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]))
    ds = conform(load_dataset(str(tmp_path), ["x"], layout="feeds"), model)
    assert len(ds) == 3 and [f["x"].shape for f in ds.batches(8)] == [(1, 3, 7), (1, 3, 9), (1, 3, 12)]
    assert all(f["x"].dtype == np.float32 for f in ds.batches(8))
    np.savez(tmp_path / "3.npz", x=np.ones((1, 4, 5)))
    with pytest.raises(InputError, match=r"each feed of input 'x' has shape \[1, 4, 5\]; the model expects \[1, 3, '\?'\]"):
        conform(load_dataset(str(tmp_path), ["x"], layout="feeds"), model)
    with pytest.raises(InputError, match="do not stack"):           # as batches, they cannot be joined
        load_dataset(str(tmp_path), ["x"], layout="batch")


def test_an_unknown_layout_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1)), __layout__=np.asarray("rows"))
    with pytest.raises(InputError, match="declares layout 'rows'"):
        load_dataset(str(tmp_path / "d.npz"), ["x"])
    with pytest.raises(InputError, match="unknown data layout 'rows'"):
        Dataset({"x": np.zeros((2, 1))}, layout="rows")


def _shifted(image: np.ndarray, dy: int, dx: int, axes=(1, 2)) -> np.ndarray:
    """`image` (one sample, no batch axis) moved by (dy, dx) along `axes`, edges repeated."""
    from onnxcompress.data import SHIFT
    pad = [(0, 0)] * image.ndim
    pad[axes[0]] = pad[axes[1]] = (SHIFT, SHIFT)
    window = [slice(None)] * image.ndim
    window[axes[0]] = slice(SHIFT + dy, SHIFT + dy + image.shape[axes[0]])
    window[axes[1]] = slice(SHIFT + dx, SHIFT + dx + image.shape[axes[1]])
    return np.pad(image, pad, mode="edge")[tuple(window)]


@pytest.mark.parametrize("shape, axes", [((5, 3, 9, 7), (1, 2)), ((5, 9, 7, 3), (0, 1))])
def test_shifted_copies_follow_each_sample_moved_by_at_most_shift_pixels(shape, axes):
    from onnxcompress.data import SHIFT, shifted_copies
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    other = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    out = shifted_copies(Dataset({"img": x, "vec": other}, np.arange(5)), copies=2, seed=1)
    assert out.feeds["img"].shape == (15, *shape[1:]) and out.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert np.array_equal(out.feeds["vec"], np.repeat(other, 3, axis=0))
    offsets = [(dy, dx) for dy in range(-SHIFT, SHIFT + 1) for dx in range(-SHIFT, SHIFT + 1)]
    moved = 0
    for i in range(5):
        assert np.array_equal(out.feeds["img"][3 * i], x[i])        # the sample itself first
        for j in (1, 2):
            copy = out.feeds["img"][3 * i + j]
            match = [o for o in offsets if np.array_equal(copy, _shifted(x[i], *o, axes=axes))]
            assert match
            moved += match[0] != (0, 0)
    assert moved >= 5


@pytest.mark.parametrize("feeds", [{"tokens": np.zeros((4, 3, 8, 8), np.int64)},      # not a float
                                   {"vec": np.zeros((4, 16), np.float32)},             # not an image
                                   {"img": np.zeros((4, 1, 4, 28), np.float32)}])     # too small to move
def test_nothing_to_shift_gives_none(feeds):
    from onnxcompress.data import shifted_copies
    assert shifted_copies(Dataset(feeds), copies=2) is None
    assert shifted_copies(Dataset({"img": np.zeros((4, 1, 8, 8), np.float32)}), copies=0) is None


def test_fingerprint_follows_the_values_not_the_object():
    a = np.random.default_rng(0).random((6, 3)).astype(np.float32)
    assert Dataset({"x": a}).fingerprint() == Dataset({"x": a.copy()}).fingerprint()
    first, second = Dataset({"x": a}).folds(3)[:2]     # two folds of one length
    assert len(first[0]) == len(second[0]) and first[0].fingerprint() != second[0].fingerprint()
    assert Dataset({"x": a}).fingerprint() != Dataset({"y": a}).fingerprint()
