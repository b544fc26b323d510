"""BatchNorm classifiers train as JEMs in both sampling modes, and sampling never touches running statistics."""

import pytest
import torch
from torch import nn

from jemkit import JEM, SGLD, DigitsDataModule, GaussianInit, ReplayBuffer, UniformInit
from jemkit.classifier import sampling_context
from jemkit.models import SmallCNN
from jemkit.presets import default_restarts
from tests.helpers import TinyMLP, loader, trainer


def test_train_mode_sampling_context_keeps_the_graph_valid_and_the_statistics_untouched():
    bn = nn.BatchNorm1d(4)
    stats = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    x = torch.randn(8, 4, requires_grad=True)
    with sampling_context(bn, "train"):
        out = bn(x)  # batch statistics
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    out.pow(2).sum().backward()  # the backward after leaving the context: failed when statistics were copied back
    assert x.grad is not None and bn.track_running_stats and bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_full_training_step_with_batchnorm_runs_backward_and_stats_see_only_data(tmp_path, mode):
    torch.manual_seed(0)
    model, reference = TinyMLP(batchnorm=True), TinyMLP(batchnorm=True)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 2), torch.arange(16) % 3
    jem = JEM(model, sampling_mode=mode, data_noise=0.0, sampler=SGLD(n_steps=3), buffer=ReplayBuffer(64))
    trainer(tmp_path, max_steps=1).fit(jem, loader(x, y, batch_size=16))
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    reference.train()
    reference(x)  # one data forward: what the running statistics must have seen
    torch.testing.assert_close(model.net[2].running_mean, reference.net[2].running_mean)
    torch.testing.assert_close(model.net[2].running_var, reference.net[2].running_var)
    assert model.net[2].num_batches_tracked == 1


def test_auto_sampling_mode_is_train_with_batchnorm_and_eval_without():
    assert JEM(TinyMLP(batchnorm=True)).chains.sampling_mode == "train"
    assert JEM(TinyMLP()).chains.sampling_mode == "eval"
    assert JEM(TinyMLP(batchnorm=True), sampling_mode="eval").chains.sampling_mode == "eval"
    with pytest.raises(ValueError, match="sampling_mode must be 'auto', 'eval' or 'train', got 'batch'"):
        JEM(TinyMLP(), sampling_mode="batch")


def test_the_default_chains_restart_from_the_box_with_batchnorm_and_from_a_mixture_without():
    with_bn, without = JEM(TinyMLP(batchnorm=True)), JEM(TinyMLP())
    assert type(with_bn.buffer.init) is UniformInit
    assert type(without.buffer.init) is GaussianInit and without.buffer.init.uniform_fraction == 0.2
    assert with_bn.hparams.buffer["init_args"]["init"]["class_path"].endswith("UniformInit")  # recorded as resolved
    syncbn = JEM(nn.SyncBatchNorm.convert_sync_batchnorm(TinyMLP(batchnorm=True)))
    assert type(syncbn.buffer.init) is UniformInit
    # what the caller or a preset names wins
    given = JEM(TinyMLP(batchnorm=True), buffer=ReplayBuffer(init=GaussianInit(uniform_fraction=0.5)))
    assert type(given.buffer.init) is GaussianInit
    assert type(JEM(TinyMLP(batchnorm=True), preset="jempp").buffer.init) is GaussianInit
    with pytest.raises(TypeError, match=r"classifier must be an nn\.Module .*not its config.*got dict"):
        default_restarts({"class_path": "jemkit.models.SmallCNN"})


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {},  # the defaults: sampling_mode="auto" resolves to "train", chains restart from the box
        {
            "sampling_mode": "eval",
            "weights": {"px": 1.0},
            "sampler": SGLD(n_steps=5, clip=(-1.0, 1.0)),
            "buffer": ReplayBuffer(capacity=2000),
        },
    ],
    ids=["defaults", "eval-mode"],
)
def test_a_batchnorm_cnn_learns_digits_as_a_jem_in_both_sampling_modes(tmp_path, settings):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    jem = JEM(SmallCNN(width=16, norm="batch"), **settings)
    trainer(tmp_path, max_steps=300, limit_val_batches=0).fit(jem, dm)
    accuracy = trainer(tmp_path).test(jem, dm, verbose=False)[0]["test/acc"]
    assert accuracy > 0.85, accuracy  # chance is 0.1; eval-mode sampling collapsed to 0.085 before the fix


def test_syncbatchnorm_classifiers_train_and_keep_their_statistics_for_data(tmp_path):
    # Lightning's sync_batchnorm=True converts BatchNorm to SyncBatchNorm. Synchronising needs GPUs under DDP (torch
    # refuses CPU tensors there), so this runs in one process, where SyncBatchNorm normalises like BatchNorm: the
    # "auto" mode must recognise it as BatchNorm and keep its running statistics for data.
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(TinyMLP(batchnorm=True))
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(TinyMLP(batchnorm=True))
    reference.load_state_dict(model.state_dict())
    assert isinstance(model.net[2], nn.SyncBatchNorm)
    x, y = torch.randn(16, 2), torch.arange(16) % 3
    jem = JEM(model, data_noise=0.0, sampler=SGLD(n_steps=3), buffer=ReplayBuffer(64))
    assert jem.chains.sampling_mode == "train"
    trainer(tmp_path, max_steps=1).fit(jem, loader(x, y, batch_size=16))
    reference.train()
    reference(x)
    torch.testing.assert_close(model.net[2].running_mean, reference.net[2].running_mean)
    assert model.net[2].num_batches_tracked == 1
