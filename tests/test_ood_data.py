import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from jemkit.data import DigitsDataModule
from jemkit.data.ood import (
    OOD_SETS,
    ConstantImages,
    GaussianNoise,
    Interpolated,
    PixelShuffled,
    UniformNoise,
    check_ood_dataset,
    make_ood_dataset,
)

SHAPE = (3, 4, 5)


@pytest.fixture(scope="module")
def digits_test() -> TensorDataset:
    dm = DigitsDataModule()
    dm.setup("test")
    return dm.test_dataset


def _stack(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


NOISE_SETS = {
    "uniform": lambda seed: UniformNoise(50, SHAPE, seed=seed),
    "gaussian": lambda seed: GaussianNoise(50, SHAPE, seed=seed),
    "constant": lambda seed: ConstantImages(50, SHAPE, seed=seed),
}


@pytest.mark.parametrize("name", sorted(NOISE_SETS))
def test_noise_sets_shape_range_label_and_determinism(name):
    dataset = NOISE_SETS[name](seed=3)
    assert len(dataset) == 50
    image, label = dataset[7]
    assert image.shape == SHAPE and image.dtype == torch.float32 and label == -1
    images = _stack(dataset)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # same seed: same items, whatever the order they are read in; another seed: other items
    again = NOISE_SETS[name](seed=3)
    assert torch.equal(again[49][0], images[49]) and torch.equal(again[-1][0], images[49])
    assert torch.equal(_stack(again), images)
    assert not torch.equal(_stack(NOISE_SETS[name](seed=4)), images)
    # items differ from each other
    assert not torch.equal(images[0], images[1])
    with pytest.raises(IndexError):
        dataset[50]


def test_noise_statistics():
    uniform = _stack(UniformNoise(200, SHAPE))
    assert abs(float(uniform.mean())) < 0.03 and uniform.min() < -0.99 and uniform.max() > 0.99
    gaussian = _stack(GaussianNoise(200, SHAPE, std=0.5))
    assert abs(float(gaussian.mean())) < 0.03
    assert 0.45 < float(gaussian.std()) < 0.5  # clamping at +-2 std trims the spread a little
    constant = _stack(ConstantImages(200, SHAPE))
    flat = constant.flatten(2)  # [N, C, H * W]
    assert torch.equal(flat, flat[:, :, :1].expand_as(flat)), "each channel must be a single value"
    assert not torch.equal(flat[:, 0, 0], flat[:, 1, 0]), "channels get their own values"
    assert abs(float(flat[:, :, 0].mean())) < 0.1


def test_pixel_shuffled_keeps_values_and_destroys_structure(digits_test):
    shuffled = PixelShuffled(digits_test, seed=1)
    assert len(shuffled) == len(digits_test)
    for i in (0, 5, 100):
        image, label = shuffled[i]
        original = digits_test[i][0]
        assert label == -1 and image.shape == original.shape == (1, 8, 8)
        assert torch.equal(image.flatten().sort().values, original.flatten().sort().values)
        assert not torch.equal(image, original)
    assert torch.equal(PixelShuffled(digits_test, seed=1)[5][0], shuffled[5][0])
    assert not torch.equal(PixelShuffled(digits_test, seed=2)[5][0], shuffled[5][0])


def test_pixel_shuffled_moves_channels_together():
    image = torch.linspace(-1, 1, 2 * 9).view(2, 3, 3)
    image[1] = -image[0]  # channel 1 mirrors channel 0 pixel by pixel
    out, _ = PixelShuffled(TensorDataset(image[None], torch.zeros(1)))[0]
    assert torch.equal(out[1], -out[0])


def test_pixel_shuffled_num_samples_uses_a_random_order(digits_test):
    shuffled = PixelShuffled(digits_test, seed=0, num_samples=600)
    assert len(shuffled) == 600
    sources = [shuffled.source_index(i) for i in range(len(digits_test))]
    assert sorted(sources) == list(range(len(digits_test))) and sources != sorted(sources)
    image, _ = shuffled[3]
    original = digits_test[shuffled.source_index(3)][0]
    assert torch.equal(image.flatten().sort().values, original.flatten().sort().values)


def test_interpolated_is_the_mean_of_two_reference_images(digits_test):
    interp = Interpolated(digits_test, seed=0)
    assert len(interp) == len(digits_test)
    reference = _stack(digits_test).flatten(1)  # [N, 64]
    image, label = interp[11]
    assert label == -1 and image.shape == (1, 8, 8)
    assert image.min() >= -1 and image.max() <= 1
    # find the pair without trusting source_indices: 2 * image - x_a must be another reference image x_b
    residual = 2 * image.flatten() - reference  # [N, 64], row a is the candidate x_b for partner a
    match = torch.cdist(residual, reference) < 1e-5  # [a, b]
    pairs = {tuple(sorted(p)) for p in match.nonzero().tolist()}
    a, b = interp.source_indices(11)
    assert a != b and tuple(sorted((a, b))) in pairs
    torch.testing.assert_close(image, (digits_test[a][0] + digits_test[b][0]) / 2)
    assert torch.equal(Interpolated(digits_test, seed=0)[11][0], image)
    assert Interpolated(digits_test, seed=1).source_indices(11) != (a, b)


def test_make_ood_dataset_builds_every_set(digits_test):
    assert OOD_SETS == ("uniform", "gaussian", "constant", "shuffled", "interp", "vflip", "invert")
    for name in OOD_SETS:
        dataset = make_ood_dataset(name, digits_test, seed=0)
        assert check_ood_dataset(dataset, (1, 8, 8), name) == len(digits_test)
        x, y = next(iter(DataLoader(dataset, batch_size=16)))  # the default collate works
        assert x.shape == (16, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
        assert y.dtype == torch.int64 and torch.equal(y, torch.full((16,), -1))
        small = make_ood_dataset(name, digits_test, num_samples=10, seed=0)
        assert len(small) == 10 and small[9][0].shape == (1, 8, 8)
    assert torch.equal(make_ood_dataset("uniform", digits_test, seed=5)[0][0], UniformNoise(1, (1, 8, 8), seed=5)[0][0])


def test_make_ood_dataset_errors(digits_test):
    with pytest.raises(ValueError, match=r"unknown OOD set 'svhn'; expected one of 'uniform', 'gaussian', 'constant'"):
        make_ood_dataset("svhn", digits_test)
    with pytest.raises(ValueError, match="reference dataset is empty"):
        make_ood_dataset("uniform", TensorDataset(torch.zeros(0, 1, 8, 8)))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got 0"):
        UniformNoise(0, SHAPE)
    with pytest.raises(ValueError, match="input_shape must be"):
        GaussianNoise(3, (3, 0))
    with pytest.raises(ValueError, match="std > 0"):
        GaussianNoise(3, SHAPE, std=0.0)
    with pytest.raises(ValueError, match="low < high"):
        UniformNoise(3, SHAPE, low=1.0, high=-1.0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        ConstantImages(3, SHAPE, seed=-1)
    with pytest.raises(ValueError, match="at least 2 items"):
        Interpolated(TensorDataset(torch.zeros(1, 2), torch.zeros(1)))


def test_check_ood_dataset_errors():
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))
    with pytest.raises(ValueError, match=r"^OOD set 'x' is empty$"):
        check_ood_dataset(empty, (1, 8, 8), "x")
    with pytest.raises(
        ValueError, match=r"OOD set 'cifar' has inputs of shape \(3, 4, 5\) but the model expects \(1, 8, 8\)"
    ):
        check_ood_dataset(UniformNoise(4, SHAPE), (1, 8, 8), "cifar")
    assert check_ood_dataset(TensorDataset(torch.zeros(4, 2)), [2], "bare") == 4


def test_mirrored_sets_flip_images_and_mirror_values_in_the_box(digits_test):
    from jemkit.data.ood import Mirrored, ood_sets_for
    from jemkit.sampling import InputDomain

    x = digits_test[0][0]
    flipped, label = make_ood_dataset("vflip", digits_test)[0]
    assert torch.equal(flipped, x.flip(-2)) and label == -1
    assert torch.equal(make_ood_dataset("invert", digits_test)[0][0], -x)  # no domain: mirrored in [-1, 1]
    box = InputDomain(low=0.0, high=1.0)
    unit = TensorDataset((digits_test.tensors[0] + 1) / 2, digits_test.tensors[1])
    torch.testing.assert_close(Mirrored(unit, "invert", box)[0][0], 1 - unit[0][0])  # dark becomes light
    assert len(make_ood_dataset("invert", digits_test, num_samples=7)) == 7
    rows = TensorDataset(torch.randn(5, 13), torch.zeros(5))
    with pytest.raises(
        ValueError, match=r"'vflip' turns images \[C, H, W\] upside down; the inputs have shape \(13,\)"
    ):
        make_ood_dataset("vflip", rows)
    assert (
        "vflip" in ood_sets_for((1, 8, 8)) and "vflip" not in ood_sets_for((13,)) and "invert" in ood_sets_for((2, 40))
    )
