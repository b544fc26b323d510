"""Compact replay-buffer storage (bf16, uint8): round trips, stochastic rounding, devices, checkpoints, training."""

import lightning.pytorch as pl
import pytest
import torch

from jemkit import JEM, PYLD, ReplayBuffer
from jemkit.models import SmallCNN
from jemkit.sampling.buffer import decode, encode
from tests.helpers import trainer


@pytest.mark.parametrize(("dtype", "bound"), [(torch.bfloat16, 2.0**-7), (torch.uint8, 2.0 / 254)])
def test_round_trip_stays_within_one_rounding_step(dtype, bound):
    torch.manual_seed(0)
    u = torch.rand(10_000) * 2 - 1
    for stochastic in (True, False):
        back = decode(encode(u, dtype, stochastic=stochastic))
        assert back.dtype == torch.float32
        step = bound * (u.abs().clamp_min(0.5) if dtype == torch.bfloat16 else 1.0)  # bf16 steps scale with |u|
        assert bool(((back - u).abs() <= step * (1.0 if stochastic else 0.5) + 1e-7).all())
    codes = encode(torch.tensor([-1.0, 1.0, 0.0]), dtype, stochastic=False)
    torch.testing.assert_close(decode(codes), torch.tensor([-1.0, 1.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_stochastic_rounding_is_unbiased(dtype):
    """A chain that moves by less than a rounding step per write must still move on average."""
    torch.manual_seed(0)
    value = torch.full((200_000,), 0.3 + 1e-3)
    mean = float(decode(encode(value, dtype)).mean())
    assert mean == pytest.approx(0.3 + 1e-3, abs=2e-4)
    nearest = float(decode(encode(value, dtype, stochastic=False)).mean())
    assert abs(nearest - (0.3 + 1e-3)) > abs(mean - (0.3 + 1e-3))


def test_uint8_clamps_into_the_box_and_stores_nan_at_the_centre():
    codes = encode(torch.tensor([-3.0, 2.0, float("nan")]), torch.uint8)
    torch.testing.assert_close(decode(codes), torch.tensor([-1.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    bf16 = decode(encode(torch.tensor([float("inf"), float("nan"), 3.0]), torch.bfloat16))
    assert bf16[0] == float("inf") and bf16[1].isnan() and bf16[2] == 3.0  # bf16 keeps float32's range


@pytest.mark.parametrize(("storage", "dtype", "size"), [("bf16", torch.bfloat16, 2), ("uint8", torch.uint8, 1)])
def test_buffer_stores_compactly_and_hands_out_float32(storage, dtype, size):
    torch.manual_seed(0)
    buffer = ReplayBuffer(capacity=50, input_shape=(3, 4), storage=storage)
    assert buffer.samples.dtype == dtype and buffer.nbytes == 50 * 12 * size
    x0, _ = buffer.sample(8)
    assert x0.dtype == torch.float32 and x0.shape == (8, 3, 4)
    idx = torch.randperm(50)[:8]  # distinct slots
    target = torch.rand(8, 3, 4) * 2 - 1
    buffer.update(idx, target)
    torch.testing.assert_close(buffer.chains(idx), target, atol=2.0 / 254 if storage == "uint8" else 2.0**-7, rtol=0)
    buffer.double()  # the module's dtype changes: the storage does not
    assert buffer.samples.dtype == dtype and buffer.sample(4)[0].dtype == torch.float32
    assert "storage" in repr(buffer) and buffer.init_args()["storage"] == storage
    buffer.reset()
    assert buffer.samples.dtype == dtype


def test_float32_storage_is_unchanged():
    buffer = ReplayBuffer(capacity=10, input_shape=(2,))
    assert buffer.samples.dtype == torch.float32 and buffer.storage == "float32"
    x = torch.rand(3, 2)
    buffer.update(torch.tensor([0, 1, 2]), x)
    assert torch.equal(buffer.samples[:3], x)  # stored as it is
    buffer.double()
    assert buffer.samples.dtype == torch.float64 and buffer.sample(2)[0].dtype == torch.float64


def test_unknown_storage_is_named():
    with pytest.raises(ValueError, match=r"storage must be one of .*'uint8'.*got 'int4'"):
        ReplayBuffer(storage="int4")


def test_state_dicts_round_trip_and_convert_between_storages():
    torch.manual_seed(0)
    compact = ReplayBuffer(capacity=20, input_shape=(5,), storage="uint8")
    restored = ReplayBuffer(capacity=20, storage="uint8")
    restored.load_state_dict(compact.state_dict())
    assert torch.equal(restored.samples, compact.samples) and restored.samples.dtype == torch.uint8
    as_float = ReplayBuffer(capacity=20)  # a compact checkpoint loads into a float32 buffer, decoded
    as_float.load_state_dict(compact.state_dict())
    assert as_float.samples.dtype == torch.float32 and torch.equal(as_float.samples, compact.chains())
    back = ReplayBuffer(capacity=20, storage="bf16")  # and a float32 one into a compact buffer, rounded to nearest
    back.load_state_dict(as_float.state_dict())
    torch.testing.assert_close(back.chains(), compact.chains(), atol=2.0**-8, rtol=0)


@pytest.mark.parametrize("storage", ["bf16", "uint8"])
def test_compact_buffer_trains_and_survives_a_checkpoint(tmp_path, storage):
    pl.seed_everything(0)
    x, y = torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 4
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    jem = JEM(SmallCNN(num_classes=4, width=4), sampler=PYLD(n_steps=2), buffer=ReplayBuffer(64, storage=storage))
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(jem, data)
    assert jem.buffer.samples.dtype == (torch.uint8 if storage == "uint8" else torch.bfloat16)
    path = tmp_path / "last.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]["buffer.samples"]
    assert saved.dtype == jem.buffer.samples.dtype  # the checkpoint is as compact as the buffer
    restored = JEM.load_from_checkpoint(path, classifier=SmallCNN(num_classes=4, width=4))
    assert restored.buffer.storage == storage and torch.equal(restored.buffer.samples, jem.buffer.samples)
    resumed = JEM(SmallCNN(num_classes=4, width=4), sampler=PYLD(n_steps=2), buffer=ReplayBuffer(64, storage=storage))
    trainer(tmp_path, max_steps=5).fit(resumed, data, ckpt_path=path)  # training resumes from the stored chains
    assert resumed.buffer.samples.dtype == jem.buffer.samples.dtype and resumed.global_step == 5
