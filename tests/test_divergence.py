from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from jemkit import JEM, SGLD, DivergenceError, ReplayBuffer
from jemkit.callbacks import DivergenceGuard
from jemkit.divergence import divergence_reasons
from tests.helpers import TinyMLP, toy_loader, trainer


class CorruptWeights(Callback):
    """Sets a weight to inf before the given steps: the next step's energies are non-finite."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            with torch.no_grad():
                pl_module.classifier.net[-1].weight[0, 0] = float("inf")


def small_jem(**kwargs):
    return JEM(TinyMLP(), sampler=SGLD(n_steps=2, step_size=0.1), buffer=ReplayBuffer(capacity=32), lr=1e-2, **kwargs)


def all_finite(state_dict):
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


def test_raise_names_quantity_and_step_and_writes_no_broken_checkpoint(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    tr = trainer(
        tmp_path,
        max_steps=10,
        enable_checkpointing=True,
        callbacks=[CorruptWeights([3]), DivergenceGuard(action="raise"), ckpt],
    )
    with pytest.raises(DivergenceError, match=r"global step 3: .*=(nan|-?inf) \(non-finite\)"):
        tr.fit(small_jem(), toy_loader())
    written = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(written) == 3  # steps 1..3 were healthy
    for path in written:
        assert all_finite(torch.load(path, weights_only=False)["state_dict"])


def test_a_huge_learning_rate_is_stopped_with_the_exploding_quantity():
    jem = JEM(TinyMLP(), sampler=SGLD(n_steps=2, step_size=0.1), buffer=ReplayBuffer(capacity=32), lr=1e4)
    with pytest.raises(DivergenceError, match=r"training diverged at global step \d+: .*energy"):
        trainer(None, max_steps=30, callbacks=[DivergenceGuard()]).fit(jem, toy_loader())


def test_exploding_energy_is_caught_by_limits():
    guard = DivergenceGuard(max_abs_energy=1e-6)
    with pytest.raises(DivergenceError, match=r"energy_data=.* \(limit 1e-06\)"):
        trainer(None, max_steps=2, callbacks=[guard]).fit(small_jem(), toy_loader())


def test_rollback_restores_snapshot_resets_buffer_lowers_lr_and_goes_on(tmp_path):
    seen = {}

    guard = DivergenceGuard(action="rollback", snapshot_every_n_steps=4, lr_factor=0.5)

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights = pl_module.classifier.net[1].weight.detach().clone()
            if trainer.global_step == 4:
                seen.setdefault("at_4", weights)
            if guard.rollbacks == 1:
                seen.setdefault("after_rollback", (weights, pl_module.buffer.samples.clone()))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    jem = small_jem()
    tr = trainer(
        tmp_path, max_steps=12, enable_checkpointing=True, callbacks=[Watch(), CorruptWeights([6]), guard, ckpt]
    )
    tr.fit(jem, toy_loader())
    assert guard.rollbacks == 1
    event = guard.events[0]
    assert event["restored_step"] == 4 and "non-finite" in event["reason"]
    assert event["lr"] == [pytest.approx(5e-3)]
    assert tr.global_step == 12 and all_finite(jem.state_dict())
    weights, buffer = seen["after_rollback"]
    assert torch.equal(weights, seen["at_4"])
    assert buffer.abs().max() <= 1.0 and torch.isfinite(buffer).all()  # re-initialised from uniform [-1, 1]
    assert tr.callback_metrics["train/rollbacks"] == 1
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        assert all_finite(torch.load(path, weights_only=False)["state_dict"])


def test_rollback_gives_up_after_max_rollbacks():
    guard = DivergenceGuard(action="rollback", max_rollbacks=2, snapshot_every_n_steps=1)
    with pytest.raises(DivergenceError, match=r"gave up after 2 rollback\(s\)"):
        trainer(None, max_steps=20, callbacks=[CorruptWeights(range(2, 20)), guard]).fit(small_jem(), toy_loader())


def test_guard_arguments():
    with pytest.raises(ValueError, match="action must be"):
        DivergenceGuard(action="ignore")
    with pytest.raises(ValueError, match="lr_factor"):
        DivergenceGuard(lr_factor=2.0)
    with pytest.raises(TypeError, match="works with a jemkit JEM, got LightningModule"):
        DivergenceGuard().setup(trainer(None), pl.LightningModule(), "fit")


def test_divergence_reasons_name_each_offending_quantity():
    stats = {
        "loss": torch.tensor(float("nan")),
        "energy_gap": torch.tensor(-5.0),
        "energy_data": torch.tensor(0.5),
        "sample_norm": torch.tensor(float("inf")),
    }
    assert divergence_reasons(stats, {"energy_gap": 1.0, "energy_data": 1.0}) == [
        "loss=nan (non-finite)",
        "energy_gap=-5 (limit 1)",
        "sample_norm=inf (non-finite)",
    ]
    assert divergence_reasons({"loss": torch.tensor(3.0)}, {"loss": 3.0}) == []  # at the limit is healthy
    assert divergence_reasons({}) == []


class RecordLR(Callback):
    """The learning rate each optimiser step uses, by global step."""

    def __init__(self):
        self.lrs = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


def test_second_rollback_halves_the_rate_once_more_even_after_a_new_snapshot():
    # Rollback at step 3 (rate 0.5x); snapshots at steps 4..7 carry the scheduled rate; rollback at step 8 -> 0.25x.
    guard = DivergenceGuard(action="rollback", snapshot_every_n_steps=1, lr_factor=0.5)
    record = RecordLR()
    trainer(None, max_steps=11, callbacks=[record, CorruptWeights([3, 8]), guard]).fit(small_jem(), toy_loader())
    assert guard.rollbacks == 2
    assert [e["lr"] for e in guard.events] == [[pytest.approx(5e-3)], [pytest.approx(2.5e-3)]]
    assert record.lrs[2] == pytest.approx(1e-2)
    assert record.lrs[5] == pytest.approx(5e-3)
    assert record.lrs[10] == pytest.approx(2.5e-3)


def test_rollback_rate_survives_schedulers_that_set_the_rate_outright():
    # LambdaLR sets lr = base * lambda(epoch) at every epoch; the rollback's factor must stay applied on top of it.
    schedule = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: 1.0 / (epoch + 1))
    jem = JEM(
        TinyMLP(), sampler=SGLD(n_steps=2, step_size=0.1), buffer=ReplayBuffer(32), lr=1e-2, lr_scheduler=schedule
    )
    guard = DivergenceGuard(action="rollback", snapshot_every_n_steps=1, lr_factor=0.5)
    record = RecordLR()
    trainer(None, max_steps=12, callbacks=[record, CorruptWeights([2]), guard]).fit(jem, toy_loader())  # 4 steps/epoch
    assert guard.rollbacks == 1
    assert record.lrs[1] == pytest.approx(1e-2)
    assert record.lrs[3] == pytest.approx(1e-2 * 0.5)  # epoch 0, after the rollback
    assert record.lrs[5] == pytest.approx(1e-2 / 2 * 0.5)  # epoch 1: LambdaLR's 1/2, still halved
    assert record.lrs[9] == pytest.approx(1e-2 / 3 * 0.5)  # epoch 2


def test_skip_drops_the_diverged_update_and_goes_on():
    guard = DivergenceGuard(action="skip")
    seen = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                seen["before"] = pl_module.classifier.net[1].weight.detach().clone()
                seen["adam"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                seen["after"] = pl_module.classifier.net[1].weight.detach().clone()
                seen["adam_after"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()
                with torch.no_grad():
                    pl_module.classifier.net[-1].weight[0, 0] = 0.0  # heal the corruption

    with pytest.warns(UserWarning, match="Skipped the update"):
        jem = small_jem()
        trainer(None, max_steps=6, callbacks=[CorruptWeights([3]), Watch(), guard]).fit(jem, toy_loader())
    assert guard.skipped_steps == 1 and guard.events[0]["action"] == "skip"
    assert torch.equal(seen["before"], seen["after"])  # no update at the diverged step
    assert torch.equal(seen["adam"], seen["adam_after"])
    assert torch.isfinite(jem.buffer.samples).all()  # the poisoned chains were re-initialised


def test_nan_inputs_are_named_as_bad_data_not_a_diverged_model():
    x, y = torch.randn(16, 2), torch.arange(16) % 3
    x[5, 1] = float("nan")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    with pytest.raises(DivergenceError, match=r"the input batch 1 contains NaN \(in samples \[1\]\) .*clean the data"):
        trainer(None, max_steps=4).fit(small_jem(), data)
