"""jemkit.batches: batches read as loaders give them (tuples, dicts, 0/1 float labels, outlier batches)."""

import pytest
import torch

from jemkit.batches import class_labels, split_outliers, unpack_batch


def test_labels_become_integer_classes_without_a_host_sync():
    assert torch.equal(class_labels(torch.tensor([[0.0], [1.0]])), torch.tensor([0, 1]))
    assert torch.equal(class_labels(torch.tensor([0.0, 0.5])), torch.tensor([0, -1]))  # named later by the checks
    assert torch.equal(class_labels(torch.tensor([True, False])), torch.tensor([1, 0]))
    assert torch.equal(class_labels(torch.tensor([2, 0])), torch.tensor([2, 0]))


def test_tuple_and_dict_batches_unpack_to_inputs_and_labels():
    x = torch.zeros(2, 3)
    for batch in ((x, torch.tensor([1.0, 0.0]), "extra"), {"x": x, "y": torch.tensor([1, 0])}):
        inputs, labels = unpack_batch(batch)
        assert inputs is x and torch.equal(labels, torch.tensor([1, 0]))
    inputs, labels = unpack_batch({"image": x, "label": torch.tensor([3, 4])})
    assert inputs is x and labels.tolist() == [3, 4]
    with pytest.raises(TypeError, match="expected batches of \\(inputs, labels\\), got Tensor"):
        unpack_batch(x)


def test_outlier_batches_are_split_from_the_labelled_data():
    data = (torch.zeros(2, 3), torch.tensor([0, 1]))
    assert split_outliers(data) == (data, None)
    outliers = torch.ones(4, 3)
    batch, found = split_outliers({"data": data, "outliers": (outliers, torch.zeros(4))})
    assert batch is data and found is outliers
    with pytest.raises(KeyError, match="needs its labelled data under 'data'"):
        split_outliers({"outliers": outliers})
