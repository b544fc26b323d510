"""The optimised paths (torch.compile, bf16 autocast, channels-last) give the same energies and sampler statistics."""

import copy
import pickle
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from jemkit import JEM, MALA, SGLD, ReplayBuffer
from jemkit.models import SmallCNN
from jemkit.sampling.compiled import CompiledStep
from jemkit.sampling.langevin import energy_and_grad
from tests.helpers import toy_loader


class QuadraticFeatures(nn.Module):
    """Linear logits on [x, x^2]: logits_c = -|x - mu_c|^2 / (2 s^2) + const, computed by nn.Linear (autocast-able)."""

    def __init__(self, means: torch.Tensor, std: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        with torch.no_grad():
            w = torch.cat([means / std**2, -0.5 * torch.ones_like(means) / std**2], 1)
            self.linear.weight.copy_(w)
            self.linear.bias.copy_(-0.5 * (means**2).sum(1) / std**2)

    def forward(self, x):
        return self.linear(torch.cat([x, x**2], 1))


def conditional_samples(jem):
    y = torch.tensor([0, 1]).repeat(2000)
    return jem.sample(len(y), y=y, n_steps=jem.sampler.n_steps, source="fresh"), y


def test_bf16_autocast_keeps_sampler_statistics():
    means = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    jem = JEM(
        QuadraticFeatures(means, 0.1),
        buffer=ReplayBuffer(capacity=100, input_shape=(2,)),
        sampler=SGLD.from_temperature(n_steps=300, step_size=2e-4),
    )
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert jem(torch.zeros(2, 2)).dtype == torch.bfloat16  # autocast really is on inside the model
        x, y = conditional_samples(jem)
    for c in (0, 1):
        torch.testing.assert_close(x[y == c].mean(0), means[c], atol=0.02, rtol=0)
        torch.testing.assert_close(x[y == c].std(0), torch.tensor([0.1, 0.1]), rtol=0.12, atol=0)


def test_bf16_mixed_trainer_trains_and_matches_fp32_energies(tmp_path):
    jem = JEM(SmallCNN(width=8), sampler=SGLD(n_steps=2), buffer=ReplayBuffer(capacity=32))
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    fp32 = jem.energy(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = jem.energy(x).detach().float()
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.02)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(16) % 10), batch_size=8)
    trainer = pl.Trainer(
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(jem, loader)
    assert jem.buffer.samples.dtype == torch.float32 and torch.isfinite(jem.buffer.samples).all()


def test_channels_last_gives_the_same_energies_and_trains(tmp_path):
    torch.manual_seed(0)
    plain = JEM(SmallCNN(width=8))
    fast = JEM(SmallCNN(width=8), channels_last=True)
    fast.classifier.load_state_dict(plain.classifier.state_dict())
    fast.setup("fit")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(fast.energy(x), plain.energy(x), atol=1e-5, rtol=1e-5)
    assert fast.classifier.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, "reduce-overhead"])
def test_compiled_sampling_matches_eager_chains(tmp_path, compile):
    from tests.helpers import TinyMLP

    torch._dynamo.reset()  # compiled code is cached per code object, across the tests of this process
    # Without noise the chains are deterministic, so eager and compiled chains must agree step for step.
    sampler = SGLD(n_steps=5, step_size=0.1, noise_std=0.0)
    eager = JEM(TinyMLP(), buffer=ReplayBuffer(capacity=64), sampler=sampler)
    compiled = JEM(TinyMLP(), buffer=ReplayBuffer(capacity=64), compile=compile, sampler=sampler)
    assert compiled.chains.compiled and compiled.chains.compile_mode == ("default" if compile is True else compile)
    compiled.classifier.load_state_dict(eager.classifier.state_dict())
    x0 = torch.rand(32, 2) * 2 - 1
    y = torch.arange(32) % 3
    for labels in (None, y):
        a, b = (jem.chains.refine(jem.energy, x0.clone(), labels) for jem in (eager, compiled))
        assert not b.requires_grad
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert all(p.grad is None for p in compiled.parameters())  # sampling computes input gradients only
    pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    ).fit(compiled, toy_loader())
    assert torch.isfinite(compiled.buffer.samples).all()


@pytest.mark.slow
def test_compiled_step_keeps_sampler_statistics_under_bf16():
    torch._dynamo.reset()
    means = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    jem = JEM(
        QuadraticFeatures(means, 0.1),
        buffer=ReplayBuffer(capacity=100, input_shape=(2,)),
        compile=True,
        sampler=SGLD.from_temperature(n_steps=300, step_size=2e-4),
    )
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, y = conditional_samples(jem)
    for c in (0, 1):
        torch.testing.assert_close(x[y == c].mean(0), means[c], atol=0.02, rtol=0)
        torch.testing.assert_close(x[y == c].std(0), torch.tensor([0.1, 0.1]), rtol=0.12, atol=0)


def test_compiled_step_is_one_graph_without_breaks():
    jem = JEM(SmallCNN(width=8), sampler=SGLD(n_steps=2, clip=(-1.0, 1.0)))
    step = CompiledStep(jem.energy, jem.sampler).step  # the function torch.compile is given
    for y in (None, torch.arange(4)):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(step)(torch.rand(4, 1, 8, 8), y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_compiled_step_runs_eagerly_past_the_recompile_limit_instead_of_failing():
    torch._dynamo.reset()
    sampler = SGLD(n_steps=2, step_size=0.1, noise_std=0.0)
    eager = JEM(SmallCNN(width=4), sampler=sampler)
    compiled = JEM(SmallCNN(width=4), sampler=sampler, compile=True)
    compiled.classifier.load_state_dict(eager.classifier.state_dict())
    with torch._dynamo.config.patch(recompile_limit=1):
        for n in (4, 6, 9):  # each new batch size would need another compilation
            x0 = torch.rand(n, 1, 8, 8) * 2 - 1
            torch.testing.assert_close(compiled.purify(x0, 2), eager.purify(x0, 2), atol=1e-4, rtol=1e-4)


class TinyGradients(nn.Module):
    """Input gradients of about 1e-7: a float16 backward without scaling leaves them in float16's subnormal range."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(x)).float() * 1e-6)  # the product in float32: exact forward


@pytest.mark.parametrize("compile", [False, True])
def test_fp16_autocast_input_gradients_are_scaled_into_range(compile):
    torch._dynamo.reset()
    torch.manual_seed(0)
    # One SGLD step of size 1e6 without noise: the step reads back the sampler's input gradient, (x - x') / 1e6.
    jem = JEM(TinyGradients(), sampler=SGLD(n_steps=1, step_size=1e6, noise_std=0.0), compile=compile)
    x = torch.rand(8, 4) * 2 - 1
    fp32 = (x - jem.purify(x, 1)) / 1e6
    _, reference = energy_and_grad(jem.energy, x)
    torch.testing.assert_close(fp32, reference, atol=1e-12, rtol=1e-3)

    def error(grad):
        return float((grad - fp32).abs().max() / fp32.abs().max())

    with torch.autocast("cpu", dtype=torch.float16):
        assert jem(x[:1]).dtype == torch.float16  # autocast really is on inside the model
        with torch.enable_grad():
            z = x.clone().requires_grad_(True)
            (unscaled,) = torch.autograd.grad(jem.energy(z).sum(), z)  # what a sampler without the scaling gets
        grad = (x - jem.purify(x, 1)) / 1e6
    assert error(unscaled) > 0.1  # what the scaling prevents
    assert error(grad) < 0.01


class GradientReversal(torch.autograd.Function):
    """Identity forward, negated backward: a custom backward that a compiled torch.func.grad would ignore."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return -grad


class ReversedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(GradientReversal.apply(x))


@pytest.mark.slow
def test_compiled_step_checks_itself_once_and_falls_back_on_custom_backwards():
    from jemkit.energy import marginal_energy
    from jemkit.sampling.compiled import CompiledStep

    torch._dynamo.reset()
    sampler = SGLD(n_steps=3, step_size=0.1, noise_std=0.0)
    classifier = ReversedMLP()
    energy = lambda x, y: marginal_energy(classifier(x))  # noqa: E731  (the custom Function sees the input itself)
    step = CompiledStep(energy, sampler)
    x0 = torch.rand(16, 2) * 2 - 1
    eager = sampler.sample(lambda x: energy(x, None), x0)
    with pytest.warns(RuntimeWarning, match="custom torch.autograd.Function"):
        first = sampler.sample(lambda x: energy(x, None), x0, step=lambda x: step(x, None))
    torch.testing.assert_close(first, eager, atol=1e-5, rtol=1e-5)
    assert step.fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning
        again = sampler.sample(lambda x: energy(x, None), x0, step=lambda x: step(x, None))
    torch.testing.assert_close(again, eager, atol=1e-5, rtol=1e-5)


def test_compiled_jem_purifies_like_the_eager_one_with_a_custom_backward():
    torch._dynamo.reset()
    sampler = SGLD(n_steps=3, step_size=0.1, noise_std=0.0)
    eager = JEM(ReversedMLP(), sampler=sampler)
    compiled = JEM(ReversedMLP(), sampler=sampler, compile=True)
    compiled.classifier.load_state_dict(eager.classifier.state_dict())
    x0 = torch.rand(16, 2) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback, if this torch drops the backward, is fine too
        torch.testing.assert_close(compiled.purify(x0, 3), eager.purify(x0, 3), atol=1e-5, rtol=1e-5)
    assert compiled.chains._compiled.checked


@pytest.mark.slow
def test_compiled_sampling_survives_deepcopy_and_pickle():
    torch._dynamo.reset()
    sampler = SGLD(n_steps=2, step_size=0.1, noise_std=0.0)
    jem = JEM(SmallCNN(width=4), sampler=sampler, compile=True)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    jem.purify(x, 2)  # compiled now
    copy_ = copy.deepcopy(jem)
    with torch.no_grad():
        for p in copy_.parameters():
            p.mul_(3.0)
    # The copy's compiled step uses the copy's weights, not the original's
    expected = JEM(SmallCNN(width=4), sampler=sampler)
    expected.classifier.load_state_dict(copy_.classifier.state_dict())
    torch.testing.assert_close(copy_.purify(x, 2), expected.purify(x, 2), atol=1e-5, rtol=1e-5)
    assert copy_.chains.classifier is copy_.classifier and copy_.chains.buffer is copy_.buffer
    restored = pickle.loads(pickle.dumps(jem))
    torch.testing.assert_close(restored.purify(x, 2), jem.purify(x, 2), atol=1e-5, rtol=1e-5)


def test_compile_options_are_checked_early():
    with pytest.raises(ValueError, match="compile must be a bool or one of"):
        JEM(SmallCNN(width=8), compile="fast")
    with pytest.raises(ValueError, match="MALA has none: sample eagerly"):
        JEM(SmallCNN(width=8), compile=True, sampler=MALA())
    bn = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="sampling_mode='eval' or compile=False"):
        JEM(bn, compile=True, sampling_mode="train")
    with pytest.raises(ValueError, match="'auto' picks 'train' for BatchNorm"):
        JEM(bn, compile=True)
    assert JEM(bn, compile=True, sampling_mode="eval").chains.compile_mode == "default"
    assert JEM(SmallCNN(width=8), compile="max-autotune").chains.compile_mode == "max-autotune"
    assert JEM(SmallCNN(width=8)).chains.compile_mode is None
    assert callable(JEM(SmallCNN(width=8), compile=True).compile)  # nn.Module.compile() is not shadowed
    with pytest.raises(ValueError, match="takes no compiled step"):
        MALA(n_steps=1).sample(lambda x: (x**2).sum(1), torch.zeros(2, 2), step=lambda x: x)


def test_only_fp16_autocast_scales_the_sampler_backward():
    from jemkit.sampling.amp import FP16_SAMPLING_GRAD_SCALE, sampling_grad_scale

    assert sampling_grad_scale("cpu") == 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sampling_grad_scale("cpu") == 1.0  # bfloat16 has float32's range
    with torch.autocast("cpu", dtype=torch.float16):
        assert sampling_grad_scale("cpu") == FP16_SAMPLING_GRAD_SCALE


# ---------------------------------------------------------------------------------------------- per-step overheads
def test_domain_maps_are_computed_once_and_follow_the_box():
    from jemkit import InputDomain

    domain = InputDomain().fit(torch.randn(200, 3, 4, 4) * 2 + 1)
    u = torch.rand(5, 3, 4, 4) * 2 - 1
    center, scale = domain.center_and_scale(u)
    assert torch.equal(domain.from_unit(u), u * scale + center)  # bit for bit the uncached formula
    assert torch.equal(domain.to_unit(domain.from_unit(u)), (u * scale + center - center) / scale)
    assert domain._unit_map(u)[0] is domain._unit_map(u)[0]  # computed once
    domain.fit(torch.randn(200, 3, 4, 4) * 5 - 3)  # a new box
    center, scale = domain.center_and_scale(u)
    assert torch.equal(domain.from_unit(u), u * scale + center)
    domain.high.add_(1.0)  # changed in place
    center, scale = domain.center_and_scale(u)
    assert torch.equal(domain.from_unit(u), u * scale + center)
    assert domain.from_unit(u.double()).dtype == torch.float64
    fresh = InputDomain().fit(torch.randn(50, 3, 4, 4) * 3)
    with torch.inference_mode():  # a map made in inference mode is not kept: it could not be saved for a backward
        fresh.from_unit(u)
    v = u.clone().requires_grad_(True)
    fresh.from_unit(v).sum().backward()
    torch.testing.assert_close(v.grad, fresh.center_and_scale(u)[1].expand_as(u).contiguous())


def test_unit_box_maps_are_the_identity():
    from jemkit import InputDomain

    u = torch.rand(4, 2) * 2 - 1
    assert InputDomain().from_unit(u) is u and InputDomain().to_unit(u) is u  # unfitted: [-1, 1]
    assert InputDomain(low=-1, high=1).from_unit(u) is u
    assert not torch.equal(InputDomain(low=0, high=1).from_unit(u), u)


def test_step_statistics_are_logged_on_the_first_step_and_when_loggers_write(tmp_path, monkeypatch):
    from tests.helpers import trainer

    logged: dict[int, dict[str, float]] = {}
    original = JEM.log

    def spy(self, name, value, *args, **kwargs):
        logged.setdefault(self.global_step, {})[name] = float(value)
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(JEM, "log", spy)
    x, y = torch.rand(48, 1, 8, 8) * 2 - 1, torch.arange(48) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    jem = JEM(SmallCNN(width=4), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=32))
    trainer(tmp_path, max_steps=6, log_every_n_steps=3).fit(jem, loader)  # one epoch of six steps
    full = {"train/loss", "train/acc", "train/ce", "train/px", "train/energy_data", "train/energy_sample"}
    for step in range(5):
        if step in (0, 2):  # the first step and the steps the loggers write ((step + 1) % 3 == 0)
            assert full <= set(logged[step])
        else:
            assert set(logged[step]) == {"train/loss"}
    assert full <= set(logged[5]) and "train/acc_epoch" in logged[6]  # the last step, then the epoch's end
    assert set(jem.step_stats) >= {"loss", "ce", "px", "energy_gap", "sample_norm"}  # every step's, for whoever reads

    logged.clear()  # the epoch's accuracy is the mean of the steps' (equal batches)
    jem = JEM(SmallCNN(width=4), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=32))
    fit = trainer(tmp_path, max_steps=6, log_every_n_steps=1)
    fit.fit(jem, loader)
    accs = [logged[step]["train/acc"] for step in range(6)]
    assert float(fit.callback_metrics["train/acc_epoch"]) == pytest.approx(sum(accs) / 6, abs=1e-6)
