import pytest
import torch
from torch import nn

from jemkit.sampling import SGLD, Chains, ReplayBuffer, UniformInit


def half_norm_energy(x, y=None):
    """E(x) = |x|^2 / 2, plus the label as an offset: dE/dx = x, so an SGLD step of size s without noise is x(1 - s)."""
    energy = 0.5 * (x**2).sum(1)
    return energy if y is None else energy + y


def test_draw_continues_the_buffer_chains_and_writes_them_back():
    buffer = ReplayBuffer(capacity=1, reinit_prob=0.0, input_shape=(3,))
    start = buffer.samples.clone()
    chains = Chains(nn.Identity(), SGLD(n_steps=2, step_size=0.5, noise_std=0.0), buffer)
    x = chains.draw(half_norm_energy, 4)
    torch.testing.assert_close(x, start.expand(4, 3) * 0.25)
    torch.testing.assert_close(buffer.samples, start * 0.25)
    assert not x.requires_grad


def test_start_and_refine_leave_the_buffer_alone():
    buffer = ReplayBuffer(capacity=8, reinit_prob=1.0, input_shape=(2,), init=UniformInit(5.0, 6.0))
    before = buffer.samples.clone()
    chains = Chains(nn.Identity(), SGLD(n_steps=3, step_size=0.5, noise_std=0.0), buffer)
    from_buffer = chains.start(16)  # what the buffer holds: no restarts, though every draw in training restarts
    assert all(any(torch.equal(row, slot) for slot in before) for row in from_buffer)
    fresh = chains.start(16, source="fresh")
    assert fresh.min() >= 5.0 and fresh.max() <= 6.0  # the initial distribution
    torch.testing.assert_close(chains.refine(half_norm_energy, fresh, n_steps=1), fresh * 0.5)
    torch.testing.assert_close(chains.refine(half_norm_energy, fresh), fresh * 0.125)  # the sampler's own 3 steps
    assert torch.equal(buffer.samples, before)


def test_the_classifier_runs_in_the_sampling_mode_and_is_restored():
    classifier = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    seen = []

    def energy(x, y=None):
        seen.append(classifier.training)
        return classifier(x).sum(1)

    chains = Chains(classifier, SGLD(n_steps=2), ReplayBuffer(capacity=4, input_shape=(2,)))
    with torch.inference_mode():  # validation callbacks sample inside inference mode
        chains.draw(energy, 3)
    assert seen == [False, False] and classifier.training
    seen.clear()
    Chains(classifier, SGLD(n_steps=1), ReplayBuffer(capacity=4, input_shape=(2,)), sampling_mode="train").draw(
        energy, 3
    )
    assert seen == [True]


def test_chains_errors():
    with pytest.raises(ValueError, match="sampling_mode must be 'auto', 'eval' or 'train'"):
        Chains(nn.Identity(), sampling_mode="batch")
    with pytest.raises(RuntimeError, match=r"no input shape yet: .*ReplayBuffer\(input_shape=...\)"):
        Chains(nn.Identity()).start(4)


def test_yopo_chains_find_the_classifiers_first_layer_and_train(tmp_path):
    import lightning.pytorch as pl

    from jemkit import JEM
    from jemkit.models import SmallCNN
    from jemkit.sampling import PYLD
    from tests.helpers import TinyMLP, toy_loader, trainer

    pl.seed_everything(0)
    cnn = JEM(SmallCNN(width=4), sampler=PYLD(n_steps=2, inner_steps=3), buffer=ReplayBuffer(capacity=32))
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(32) % 10), batch_size=16)
    trainer(tmp_path, max_steps=2).fit(cnn, data)
    assert cnn.chains._first_layer[0] == "features.0.0"  # the first convolution
    assert cnn.sample(3).shape == (3, 1, 8, 8) and torch.isfinite(cnn.step_stats["loss"])
    mlp = JEM(TinyMLP(), sampler=PYLD(n_steps=1, inner_steps=2), buffer=ReplayBuffer(capacity=32))
    trainer(tmp_path, max_steps=1).fit(mlp, toy_loader())
    assert mlp.chains._first_layer[0] == "net.0"  # Flatten: the first module that takes the input
    named = JEM(TinyMLP(), sampler=PYLD(n_steps=1, inner_steps=2, first_layer="net.9"), buffer=ReplayBuffer(32))
    with pytest.raises(ValueError, match=r"first_layer='net\.9'.*no such submodule"):
        trainer(tmp_path, max_steps=1).fit(named, toy_loader())
    with pytest.raises(ValueError, match="compile does not take PYLD's inner"):
        JEM(TinyMLP(), sampler=PYLD(inner_steps=2), compile=True)


def test_yopo_chains_refuse_classifiers_that_transform_their_input_first():
    from jemkit.sampling import PYLD

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 3)

        def forward(self, x):
            return self.linear(2 * x)

    chains = Chains(Scaled(), PYLD(n_steps=1, inner_steps=2), ReplayBuffer(capacity=8, input_shape=(2,)))
    with pytest.raises(ValueError, match="takes its input as it is"):
        chains.draw(lambda x, y=None: -chains.classifier(x).logsumexp(1), 4)


def test_sample_is_the_one_policy_for_both_sources():
    buffer = ReplayBuffer(capacity=4, reinit_prob=1.0, input_shape=(2,), init=UniformInit(5.0, 6.0))
    before = buffer.samples.clone()
    chains = Chains(nn.Identity(), SGLD(n_steps=1, step_size=0.5, noise_std=0.0), buffer)
    assert chains.steps_for("buffer") == 1 and chains.steps_for("fresh") == 5 and chains.steps_for("fresh", 2) == 2
    assert chains.steps_for("init") == 0 and chains.steps_for("init", 3) == 0  # where sampling starts
    stored = chains.sample(half_norm_energy, 8, source="buffer")  # one step of x(1 - 0.5) from stored chains
    assert all(any(torch.allclose(row, slot * 0.5) for slot in before) for row in stored)
    fresh = chains.sample(half_norm_energy, 8, source="fresh")  # five steps from U(5, 6)
    assert fresh.min() >= 5.0 / 32 - 1e-6 and fresh.max() <= 6.0 / 32 + 1e-6
    assert torch.equal(buffer.samples, before)
    start = chains.sample(half_norm_energy, 8, source="init")
    assert start.min() >= 5.0 and start.max() <= 6.0
    with pytest.raises(ValueError, match="unknown sample source 'replay'; expected one of 'buffer', 'fresh', 'init'"):
        chains.sample(half_norm_energy, 2, source="replay")
    with pytest.raises(ValueError, match="n_steps must be an integer >= 0"):
        chains.steps_for("buffer", -1)
