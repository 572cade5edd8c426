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
    assert ds.feeds["x"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]


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
    with pytest.raises(InputError, match="'temperature' is a scalar"):
        load_dataset(str(tmp_path / "d.npz"), ["x", "temperature"])
