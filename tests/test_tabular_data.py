"""Tests of jemkit.data.TabularDataModule: scikit-learn datasets and user arrays, the stratified split, train-only
standardisation, float binary labels, the command line, and its error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_iris, load_wine
from torch.utils.data import RandomSampler, SequentialSampler

from jemkit.data import TabularDataModule
from jemkit.data.tabular import SKLEARN_DATASETS

LOADERS = {"wine": load_wine, "breast_cancer": load_breast_cancer, "iris": load_iris}


def _splits(dm: TabularDataModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [ds.tensors for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]


def _built(**kwargs) -> TabularDataModule:
    dm = TabularDataModule(**kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    ("name", "num_classes", "num_features"), [("wine", 3, 13), ("breast_cancer", 2, 30), ("iris", 3, 4)]
)
def test_sklearn_datasets_attributes_shapes_and_dtypes(name, num_classes, num_features):
    dm = TabularDataModule.from_sklearn(name)
    bunch = LOADERS[name]()
    assert dm.num_classes == num_classes and dm.input_shape == (num_features,)
    assert dm.feature_names == list(bunch.feature_names) and dm.class_names == list(bunch.target_names)
    assert dm.classes == list(range(num_classes)) and dm.data_range is None
    dm.setup("fit")
    for x, y in _splits(dm):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (num_features,) and y.shape == x.shape[:1]


@pytest.mark.parametrize("name", ["wine", "breast_cancer", "iris"])
def test_split_partitions_the_dataset_in_stratified_fractions(name):
    dm = _built(dataset=name, standardize=False)
    features, labels = LOADERS[name](return_X_y=True)
    sizes = [len(y) for _, y in _splits(dm)]
    assert sum(sizes) == len(labels)
    assert abs(sizes[1] - 0.15 * len(labels)) <= 1.5 and abs(sizes[2] - 0.15 * len(labels)) <= 1.5
    # Every example (row and label) appears exactly once across the three splits.
    expected = sorted(
        row.astype(np.float32).tobytes() + bytes([lab]) for row, lab in zip(features, labels, strict=True)
    )
    seen = sorted(xi.numpy().tobytes() + bytes([int(yi)]) for x, y in _splits(dm) for xi, yi in zip(x, y, strict=True))
    assert seen == expected
    total = np.bincount(labels)
    for (_, y), fraction in zip(_splits(dm), (0.7, 0.15, 0.15), strict=True):
        counts = torch.bincount(y, minlength=len(total)).numpy()
        assert (counts > 0).all()
        assert np.abs(counts - fraction * total).max() <= 1.5


def test_split_is_deterministic_per_seed():
    a, b, c = _built(dataset="wine", seed=3), _built(dataset="wine", seed=3), _built(dataset="wine", seed=4)
    for (xa, ya), (xb, yb) in zip(_splits(a), _splits(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.test_dataset.tensors[0], c.test_dataset.tensors[0])


def test_standardisation_uses_the_training_split_only():
    raw, std = _built(dataset="wine", standardize=False), _built(dataset="wine")
    raw_train, raw_test = raw.train_dataset.tensors[0].double(), raw.test_dataset.tensors[0].double()
    mean, sd = raw_train.mean(0), raw_train.std(0, correction=0)
    torch.testing.assert_close(std.feature_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.feature_std.double(), sd, rtol=1e-6, atol=1e-6)
    train = std.train_dataset.tensors[0].double()
    torch.testing.assert_close(train.mean(0), torch.zeros(13, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(train.std(0, correction=0), torch.ones(13, dtype=torch.float64), rtol=0, atol=1e-5)
    # The other splits are standardised with the training statistics, not their own.
    test = std.test_dataset.tensors[0].double()
    torch.testing.assert_close(test, (raw_test - mean) / sd, rtol=1e-5, atol=1e-5)
    assert test.mean(0).abs().max() > 0.05 and (test.std(0, correction=0) - 1).abs().max() > 0.05
    assert train.abs().max() > 1.5  # standardised features are not squeezed into [-1, 1]


def test_constant_feature_is_only_centred():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(60, 2)), np.full((60, 1), 7.0)], axis=1)
    dm = _built(x=x, y=np.arange(60) % 2)
    assert torch.isfinite(dm.train_dataset.tensors[0]).all()
    assert (dm.train_dataset.tensors[0][:, 2] == 0).all() and dm.feature_std[2] == 1


def test_arrays_tensors_and_lists_give_the_same_module():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(90, 5)), np.repeat([0, 1, 2], 30)
    from_numpy = _built(x=x, y=y, seed=2)
    from_torch = _built(x=torch.from_numpy(x), y=torch.from_numpy(y), seed=2)
    from_lists = _built(x=x.tolist(), y=y.tolist(), seed=2)
    column = _built(x=x, y=y[:, None], seed=2)  # labels [N, 1] are accepted too
    for other in (from_torch, from_lists, column):
        for (xa, ya), (xb, yb) in zip(_splits(from_numpy), _splits(other), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert from_numpy.num_classes == 3 and from_numpy.input_shape == (5,) and from_numpy.feature_names is None


def test_arbitrary_label_values_become_sorted_class_indices():
    x = np.random.default_rng(2).normal(size=(40, 3))
    y = np.array(["spam", "ham"] * 20)
    dm = _built(x=x, y=y, feature_names=["a", "b", "c"])
    assert dm.classes == ["ham", "spam"] and dm.class_names == ["ham", "spam"] and dm.num_classes == 2
    assert dm.feature_names == ["a", "b", "c"]
    raw = _built(x=x, y=y, standardize=False)
    x_train, y_train = raw.train_dataset.tensors
    for xi, yi in zip(x_train, y_train, strict=True):
        row = int(np.flatnonzero(np.isclose(x, xi.numpy()).all(1))[0])
        assert dm.classes[int(yi)] == y[row]


def test_feature_names_from_a_dataframe_like_input():
    class Frame:  # what TabularDataModule reads from a pandas DataFrame: columns and the array
        columns = ("height", "weight")

        def __init__(self, values: np.ndarray) -> None:
            self.values = values

        def __array__(self, dtype=None, copy=None) -> np.ndarray:
            return self.values

    dm = TabularDataModule(x=Frame(np.random.default_rng(3).normal(size=(30, 2))), y=np.arange(30) % 3)
    assert dm.feature_names == ["height", "weight"] and dm.input_shape == (2,)


def test_float_labels_for_a_one_logit_binary_head():
    long, flt = _built(dataset="breast_cancer"), _built(dataset="breast_cancer", label_dtype="float")
    assert flt.num_classes == 2
    for (x_long, y_long), (x_float, y_float) in zip(_splits(long), _splits(flt), strict=True):
        assert torch.equal(x_long, x_float)
        assert y_float.dtype == torch.float32 and y_float.shape == (len(y_long), 1)
        assert torch.equal(y_float[:, 0], y_long.float())
        assert set(y_float.unique().tolist()) == {0.0, 1.0}
    x, y = next(iter(flt.train_dataloader()))
    assert x.shape == (32, 30) and y.shape == (32, 1) and y.dtype == torch.float32


def test_loaders():
    dm = _built(dataset="breast_cancer", batch_size=50)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    assert len(train) == len(dm.train_dataset) // 50
    for loader, dataset in ((dm.val_dataloader(), dm.val_dataset), (dm.test_dataloader(), dm.test_dataset)):
        assert isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
        assert torch.equal(torch.cat([x for x, _ in loader]), dataset.tensors[0])


def test_setup_is_idempotent_and_arrays_stay_out_of_the_hyperparameters():
    x, y = np.random.default_rng(4).normal(size=(40, 3)), np.arange(40) % 2
    dm = _built(x=x, y=y)
    train = dm.train_dataset
    for stage in ("fit", "validate", "test", "predict", None):
        dm.setup(stage)
    assert dm.train_dataset is train
    assert "x" not in dm.hparams and "y" not in dm.hparams and dm.hparams["standardize"] is True


def test_digits_is_available_as_a_table():
    dm = TabularDataModule.from_sklearn("digits")
    assert set(SKLEARN_DATASETS) == {"breast_cancer", "digits", "iris", "wine"}
    assert dm.num_classes == 10 and dm.input_shape == (64,) and dm.feature_names[0] == "pixel_0_0"


def test_command_line_builds_it_from_a_dataset_name(tmp_path, monkeypatch):
    from jemkit.cli import JEMCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["jemkit"])
    args = [
        "--seed_everything=0",
        "--data=jemkit.data.TabularDataModule",
        "--data.dataset=wine",
        "--data.batch_size=16",
        "--model.classifier=jemkit.models.MLP",
        "--model.classifier.num_features=13",
        "--model.classifier.num_classes=3",
        "--trainer.logger=false",
    ]
    cli = JEMCLI(args=args, run=False)
    assert isinstance(cli.datamodule, TabularDataModule)
    assert cli.datamodule.num_classes == 3 and cli.datamodule.batch_size == 16
    assert cli.model.classifier(torch.zeros(2, 13)).shape == (2, 3)


X3 = np.random.default_rng(5).normal(size=(30, 3))
Y3 = np.arange(30) % 3


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"x": X3, "y": Y3[:29]},
            ValueError,
            r"x and y must have the same length N, got 30 examples in x and 29 labels",
        ),
        ({"x": X3[:, 0], "y": Y3}, ValueError, r"x must be 2-D \[N, D\].*got shape \(30,\).*reshape\(-1, 1\)"),
        ({"x": X3[None], "y": Y3}, ValueError, r"x must be 2-D \[N, D\].*got shape \(1, 30, 3\)"),
        ({"x": np.where(X3 > 1.5, np.nan, X3), "y": Y3}, ValueError, r"x must be finite, got \d+ NaN or infinite"),
        ({"x": X3, "y": np.zeros(30)}, ValueError, r"y must hold at least 2 classes to classify, got 1: \[0.0\]"),
        ({"x": X3, "y": np.zeros((30, 2))}, ValueError, r"y must be 1-D \[N\].*got shape \(30, 2\)"),
        (
            {"dataset": "mnist"},
            ValueError,
            r"unknown dataset 'mnist'; known datasets: breast_cancer, digits, iris, wine",
        ),
        ({"dataset": "wine", "x": X3, "y": Y3}, ValueError, r"give either dataset or the arrays x and y, not both"),
        ({}, ValueError, r"give dataset \(one of 'breast_cancer', .*\) or both arrays.*got x=None and y=None"),
        ({"x": X3}, ValueError, r"or both arrays x \[N, D\] and y \[N\]; got x=an array and y=None"),
        ({"dataset": "wine", "label_dtype": "float"}, ValueError, r"label_dtype='float' .* exactly 2 classes, got 3"),
        (
            {"dataset": "wine", "label_dtype": "int"},
            ValueError,
            r"unknown label_dtype 'int'; expected one of 'long', 'float'",
        ),
        (
            {"x": X3, "y": Y3, "feature_names": ["a"]},
            ValueError,
            r"feature_names must name each of the 3 features, got 1",
        ),
        ({"x": X3[:4], "y": Y3[:4]}, ValueError, r"cannot split 4 examples with class counts \[2, 1, 1\]"),
        ({"dataset": "wine", "batch_size": 0}, ValueError, r"batch_size must be an integer >= 1, got 0"),
        ({"dataset": "wine", "val_fraction": 1.0}, ValueError, r"val_fraction must be in the open interval \(0, 1\)"),
        ({"x": [["a", "b"], ["c", "d"]], "y": [0, 1]}, TypeError, r"x must hold numbers, got dtype <U1"),
    ],
)
def test_rejects_bad_inputs(kwargs, error, message):
    with pytest.raises(error, match=message):
        TabularDataModule(**kwargs)
