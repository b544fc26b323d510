import math

import pytest
import torch
from torch import nn

from jemkit.sampling import MALA, PYLD, SGLD, GaussianInit, ReplayBuffer, Sampler, UniformInit

MU = torch.tensor([1.0, -2.0])
SCALE = torch.tensor([0.5, 1.0])


def quadratic_energy(x: torch.Tensor) -> torch.Tensor:
    """E(x) = 0.5 * sum((x - mu)^2 / s^2): its Gibbs distribution is N(mu, diag(s^2))."""
    return 0.5 * (((x - MU) / SCALE) ** 2).sum(1)


def test_sgld_matches_gaussian_target():
    step = 0.01
    sampler = SGLD.from_temperature(n_steps=1500, step_size=step)
    x = sampler.sample(quadratic_energy, torch.zeros(8000, 2))
    # the unadjusted chain is biased by O(step): stationary variance s^2 / (1 - step / (2 s^2))
    expected_var = SCALE**2 / (1 - step / (2 * SCALE**2))
    torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
    torch.testing.assert_close(x.var(0), expected_var, rtol=0.06, atol=0)


def test_sgld_respects_temperature():
    sampler = SGLD.from_temperature(n_steps=1500, step_size=0.005, temperature=4.0)
    x = sampler.sample(quadratic_energy, torch.zeros(8000, 2))
    torch.testing.assert_close(x.var(0), 4.0 * SCALE**2, rtol=0.08, atol=0)


def test_mala_is_exact_with_large_steps():
    sampler = MALA(n_steps=400, step_size=0.1)
    x = sampler.sample(quadratic_energy, torch.zeros(8000, 2))
    torch.testing.assert_close(x.mean(0), MU, atol=0.04, rtol=0)
    # SGLD with this step would be biased by 10% in the first coordinate; MALA is not
    torch.testing.assert_close(x.var(0), SCALE**2, rtol=0.06, atol=0)
    assert 0.3 < float(sampler.acceptance_rate) < 1.0


def test_sgld_jem_defaults_and_zero_steps():
    sampler = SGLD()
    assert (sampler.n_steps, sampler.step_size, sampler.noise_std) == (20, 1.0, 0.01)
    x0 = torch.randn(4, 2)
    torch.testing.assert_close(sampler.sample(quadratic_energy, x0, n_steps=0), x0)


def test_sgld_single_step_formula():
    torch.manual_seed(1)
    x0 = torch.randn(16, 2)
    sampler = SGLD(n_steps=1, step_size=0.3, noise_std=0.0)
    grad = (x0 - MU) / SCALE**2
    torch.testing.assert_close(sampler.sample(quadratic_energy, x0), x0 - 0.3 * grad)


def test_sgld_clip():
    x = SGLD(n_steps=5, step_size=10.0, noise_std=0.1, clip=(-1, 1)).sample(quadratic_energy, torch.zeros(64, 2))
    assert x.min() >= -1 and x.max() <= 1


def test_sampler_computes_only_input_gradients():
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    params_before = [p.detach().clone() for p in model.parameters()]
    SGLD(n_steps=3).sample(lambda x: -torch.logsumexp(model(x), 1), torch.randn(5, 2))
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True))


def test_energy_fn_must_return_one_energy_per_sample():
    with pytest.raises(ValueError, match="one energy per sample"):
        SGLD(n_steps=1).sample(lambda x: x.sum(), torch.zeros(3, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_steps": -1}, "n_steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"clip": (1.0, -1.0)}, "clip"),
    ],
)
def test_sgld_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SGLD(**kwargs)


# ----------------------------------------------------------------------------- initial distributions
def test_uniform_init_range_and_moments():
    x = UniformInit(-1.0, 3.0).sample(20000, (3,))
    assert x.min() >= -1.0 and x.max() <= 3.0
    torch.testing.assert_close(x.mean(), torch.tensor(1.0), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="low < high"):
        UniformInit(1.0, 1.0)


def test_gaussian_init_fits_class_statistics():
    y = torch.arange(2).repeat_interleave(5000)
    x = torch.stack([torch.randn(5000, 2) * 0.1 + 0.5, torch.randn(5000, 2) * 0.2 - 0.5]).reshape(-1, 2)
    init = GaussianInit().fit(x, y, num_classes=2)
    samples = init.sample(4000, (2,), y=torch.ones(4000, dtype=torch.long))
    torch.testing.assert_close(samples.mean(0), torch.tensor([-0.5, -0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.tensor([0.2, 0.2]), atol=0.02, rtol=0)
    with pytest.warns(UserWarning, match=r"no examples of classes \[1\] in the 10 fitted inputs"):
        init = GaussianInit().fit(x[:10], y[:10], num_classes=2)  # class 1 unseen: the pooled Gaussian
    torch.testing.assert_close(init.means[1], x[:10].mean(0))
    torch.testing.assert_close(init.class_probs, torch.tensor([1.0, 0.0]))  # unconditional chains never pick it


# ----------------------------------------------------------------------------- replay buffer
def test_buffer_reinit_rate_matches_setting():
    buffer = ReplayBuffer(capacity=500, reinit_prob=0.05, input_shape=(4,))
    buffer.samples.fill_(5.0)  # outside the init range [-1, 1]: a re-initialised start point is recognisable
    x0, _ = buffer.sample(40000)
    fresh = (x0.abs() <= 1).all(1).float().mean().item()
    assert abs(fresh - 0.05) < 4 * math.sqrt(0.05 * 0.95 / 40000)
    assert ((x0 == 5.0).all(1) | (x0.abs() <= 1).all(1)).all()


def test_buffer_update_round_trip():
    buffer = ReplayBuffer(capacity=10, reinit_prob=0.0, input_shape=(2,))
    idx = torch.tensor([3, 7])
    buffer.update(idx, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x0, got = buffer.sample(2000)
    rows = x0[got == 7]
    assert len(rows) > 0 and torch.equal(rows, torch.tensor([[3.0, 4.0]]).expand_as(rows))
    with pytest.raises(ValueError, match="cannot write samples"):
        buffer.update(idx, torch.zeros(2, 3))


def test_conditional_buffer_draws_from_slots_of_the_label():
    buffer = ReplayBuffer(capacity=30, reinit_prob=0.0, input_shape=(1,), num_classes=3, conditional=True)
    buffer.update(torch.arange(30), (torch.arange(30) % 3).float()[:, None])
    y = torch.randint(0, 3, (500,))
    x0, idx = buffer.sample(500, y)
    assert torch.equal(idx % 3, y)
    assert torch.equal(x0[:, 0].long(), y)
    assert torch.equal(buffer.labels[idx], y)


def test_buffer_state_dict_loads_into_unsized_buffer():
    source = ReplayBuffer(capacity=20, input_shape=(1, 4, 4), num_classes=2, conditional=True)
    target = ReplayBuffer(capacity=20, num_classes=2, conditional=True)
    assert not target.is_initialized
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.samples, source.samples)
    assert torch.equal(target.labels, source.labels)
    assert target.input_shape == (1, 4, 4)


def test_a_fitted_restart_distribution_is_kept_or_its_loss_named():
    fitted = GaussianInit().fit(torch.randn(12, 1, 4, 4), torch.arange(12) % 2, num_classes=2)
    source = ReplayBuffer(capacity=20, input_shape=(1, 4, 4), num_classes=2, init=fitted)
    same_kind = ReplayBuffer(capacity=20, num_classes=2, init=GaussianInit())
    same_kind.load_state_dict(source.state_dict())
    assert torch.equal(same_kind.init.means, fitted.means)
    other_kind = ReplayBuffer(capacity=20, num_classes=2, init=UniformInit())
    with pytest.warns(UserWarning, match="restarted its chains from a fitted distribution.*UniformInit"):
        other_kind.load_state_dict(source.state_dict())
    assert torch.equal(other_kind.samples, source.samples)  # the chains themselves are kept


def test_buffer_errors():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=0)
    with pytest.raises(ValueError, match="reinit_prob"):
        ReplayBuffer(reinit_prob=1.5)
    with pytest.raises(ValueError, match="needs num_classes"):
        ReplayBuffer(conditional=True, input_shape=(2,))
    with pytest.raises(ValueError, match="smaller than num_classes"):
        ReplayBuffer(capacity=2, num_classes=3, conditional=True, input_shape=(2,))
    with pytest.raises(RuntimeError, match="no input shape"):
        ReplayBuffer().sample(4)
    with pytest.raises(ValueError, match="not conditional"):
        ReplayBuffer(input_shape=(2,)).sample(2, torch.zeros(2, dtype=torch.long))


def test_buffer_keeps_an_equal_shard_per_rank_and_reinitialises_only_when_needed():
    buffer = ReplayBuffer(capacity=100, input_shape=(2,))
    before = buffer.samples.clone()
    buffer.ensure_initialized((2,))  # already this (single) rank's shard: untouched
    assert torch.equal(buffer.samples, before)
    buffer.ensure_initialized((2,), world_size=4)  # one of four ranks: a quarter of the slots
    assert buffer.capacity == 25 and buffer.total_capacity == 100 and buffer.samples.shape == (25, 2)
    conditional = ReplayBuffer(capacity=100, num_classes=3, conditional=True)
    conditional.initialize((2,), world_size=2)  # shards are whole multiples of the class count
    assert conditional.capacity == 48 and torch.equal(conditional.labels, torch.arange(48) % 3)
    assert torch.equal(buffer.gather_shards()["samples"], buffer.samples)  # one process: its own shard


def test_buffer_replaces_only_non_finite_slots():
    buffer = ReplayBuffer(capacity=6, input_shape=(3,), num_classes=2, conditional=True, init=GaussianInit())
    buffer.samples[1, 0] = float("nan")
    buffer.samples[4, 2] = float("inf")
    healthy = buffer.samples[[0, 2, 3, 5]].clone()
    assert buffer.reinit_nonfinite() == 2
    assert torch.isfinite(buffer.samples).all() and torch.equal(buffer.samples[[0, 2, 3, 5]], healthy)
    assert buffer.reinit_nonfinite() == 0


def test_buffer_config_round_trips_with_its_initial_distribution():
    from jemkit._config import from_config, to_config

    buffer = ReplayBuffer(capacity=40, reinit_prob=0.2, init=GaussianInit(-2.0, 2.0, fit_batches=7), input_shape=(2,))
    buffer.initialize((2,), world_size=2)  # a rank's shard: the config keeps the total
    config = to_config(buffer)
    assert config["init_args"]["capacity"] == 40
    assert config["init_args"]["init"]["class_path"] == "jemkit.sampling.init.GaussianInit"
    rebuilt = from_config(config, ReplayBuffer)
    assert (rebuilt.capacity, rebuilt.reinit_prob, rebuilt.input_shape) == (40, 0.2, (2,))
    assert isinstance(rebuilt.init, GaussianInit) and (rebuilt.init.low, rebuilt.init.fit_batches) == (-2.0, 7)


def test_pyld_moves_each_coordinate_at_most_step_times_eps_and_stays_in_range():
    from jemkit.sampling import PYLD

    steep = lambda x: 100.0 * (x**2).sum(1)  # noqa: E731  gradients up to 200: clipped to eps
    x0 = torch.rand(256, 4) * 2 - 1
    one = PYLD(n_steps=1, step_size=0.1, eps=0.5).sample(steep, x0)
    moved = (one - x0).abs()
    assert moved.max() <= 0.05 + 1e-6 and (moved > 0.049).float().mean() > 0.9  # the full clipped step, mostly
    far = x0.abs() >= 0.05
    assert torch.all(one[far].sign() == x0[far].sign()) and torch.all(one[far].abs() < x0[far].abs())  # toward 0
    # Toward a minimum outside the range: chains stop at the boundary
    outside = PYLD(n_steps=50, step_size=0.2).sample(lambda x: ((x - 3.0) ** 2).sum(1), x0)
    assert torch.equal(outside, torch.ones_like(x0))
    # Toward a minimum inside the range: chains settle within one step of it
    inside = PYLD(n_steps=400, step_size=0.01).sample(quadratic_energy, torch.zeros(64, 2))
    torch.testing.assert_close(inside, MU.clamp(-1, 1).expand(64, 2), atol=0.011, rtol=0)


def test_pyld_noise_and_errors():
    from jemkit.sampling import PYLD

    x = PYLD(n_steps=1, step_size=0.1, noise_std=0.1).sample(lambda x: 0 * x.sum(1), torch.zeros(4000, 1))
    assert abs(float(x.std()) - 0.1) < 0.01  # flat energy: the noise alone
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        PYLD(eps=0.0)
    with pytest.raises(ValueError, match="needs the data range"):
        PYLD(clip=None)


def test_gaussian_restarts_can_mix_in_uniform_draws_over_the_box():
    from jemkit import GaussianInit

    x, y = torch.randn(400, 2) * 0.05 + 0.5, torch.zeros(400, dtype=torch.long)  # data in a tiny corner
    init = GaussianInit(uniform_fraction=0.5).fit(x, y, num_classes=1)
    draws = init.sample(4000, (2,))
    far = (draws - 0.5).abs().amax(1) > 0.3  # impossible under the fitted Gaussian (6 std)
    assert abs(float(far.float().mean()) - 0.5 * 0.91) < 0.05  # half uniform on [-1, 1]^2, 91% of which land that far
    assert float(GaussianInit().fit(x, y, 1).sample(1000, (2,)).sub(0.5).abs().amax()) < 0.3
    with pytest.raises(ValueError, match="uniform_fraction must be in"):
        GaussianInit(uniform_fraction=1.5)


# ---------------------------------------------------------------------------------------------- YOPO inner steps
def _mlp_energy(first: nn.Module, rest: nn.Module):
    return lambda x: -rest(first(x)).logsumexp(1)


def test_yopo_steps_through_a_linear_layer_repeat_the_outer_gradient():
    """With a linear first layer the inner gradient does not depend on x: N inner steps of s are one step of N * s."""
    from jemkit.sampling import PYLD, FirstLayer

    torch.manual_seed(0)
    first, rest = nn.Linear(3, 16), nn.Sequential(nn.Tanh(), nn.Linear(16, 4))
    energy = _mlp_energy(first, rest)
    x0 = torch.randn(32, 3) * 0.1
    wide = {"eps": 100.0, "clip": (-50.0, 50.0)}  # no clipping of gradients or samples
    yopo = PYLD(n_steps=3, step_size=0.05, inner_steps=4, **wide).sample(energy, x0, first_layer=FirstLayer(first))
    long_steps = PYLD(n_steps=3, step_size=0.2, **wide).sample(energy, x0)
    torch.testing.assert_close(yopo, long_steps, atol=1e-5, rtol=1e-5)


def test_yopo_inner_steps_hold_the_gradient_at_the_first_layers_output():
    """A nonlinear first block: each inner step follows d<g(x), p>/dx with p = dE/dg taken at the outer point."""
    from jemkit.sampling import PYLD, FirstLayer

    torch.manual_seed(0)
    first, rest = nn.Sequential(nn.Linear(2, 8), nn.Tanh()), nn.Linear(8, 3)
    energy = _mlp_energy(first, rest)
    x0 = torch.rand(16, 2) * 2 - 1
    sampler = PYLD(n_steps=2, step_size=0.1, eps=0.5, inner_steps=3)
    got = sampler.sample(energy, x0, first_layer=FirstLayer(first))
    x = x0.clone()
    for _ in range(2):  # the reference, with torch.func
        z, vjp_first = torch.func.vjp(first, x)
        p = torch.func.grad(lambda z: -rest(z).logsumexp(1).sum())(z)
        for _ in range(3):
            x = (x - 0.1 * vjp_first(p)[0].clamp(-0.5, 0.5)).clamp(-1, 1)
            z, vjp_first = torch.func.vjp(first, x)
    torch.testing.assert_close(got, x, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, PYLD(n_steps=2, step_size=0.3, eps=0.5).sample(energy, x0), atol=1e-3)


def test_yopo_takes_one_full_forward_per_outer_step():
    from jemkit.sampling import PYLD, FirstLayer

    first, rest = nn.Linear(2, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 3))
    calls = {"first": 0, "rest": 0}
    first.register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1))
    rest.register_forward_hook(lambda *a: calls.__setitem__("rest", calls["rest"] + 1))
    PYLD(n_steps=3, inner_steps=4).sample(_mlp_energy(first, rest), torch.zeros(4, 2), first_layer=FirstLayer(first))
    assert calls["rest"] == 3  # full passes
    assert calls["first"] == 3 + 3 * 3 + 1  # each full pass, three inner steps after each, the one-time check


def test_yopo_refuses_what_it_cannot_do():
    from jemkit.sampling import PYLD, FirstLayer

    first, rest = nn.Linear(2, 8), nn.Linear(8, 3)
    sampler = PYLD(n_steps=2, inner_steps=2)
    with pytest.raises(ValueError, match="pass first_layer=FirstLayer"):
        sampler.sample(_mlp_energy(first, rest), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="takes no compiled step"):
        sampler.sample(_mlp_energy(first, rest), torch.zeros(4, 2), step=lambda x: x, first_layer=FirstLayer(first))
    bypass = lambda x: -(rest(first(x)) + x.sum(1, keepdim=True)).logsumexp(1)  # noqa: E731
    with pytest.raises(ValueError, match="reaches the energy other than through"):
        sampler.sample(bypass, torch.rand(4, 2), first_layer=FirstLayer(first))
    twice = lambda x: -rest(first(x) + first(x)).logsumexp(1)  # noqa: E731
    with pytest.raises(ValueError, match="ran 2 times in one forward"):
        sampler.sample(twice, torch.rand(4, 2), first_layer=FirstLayer(first))
    with pytest.raises(ValueError, match="inner_steps must be"):
        PYLD(inner_steps=0)
    with pytest.raises(TypeError, match="first_layer must be a submodule's name"):
        PYLD(first_layer=first)
    assert "inner_steps=2" in repr(sampler) and "inner_steps" not in repr(PYLD())


def test_samplers_declare_what_they_can_do():
    assert SGLD().has_pure_step and SGLD().is_random and not SGLD(noise_std=0.0).is_random
    assert not SGLD().steps_through_first_layer
    assert PYLD().has_pure_step and not PYLD().is_random and not PYLD().steps_through_first_layer
    yopo = PYLD(inner_steps=3)
    assert yopo.steps_through_first_layer and not yopo.has_pure_step  # a step is not one update
    mala = MALA()
    assert not mala.has_pure_step and mala.is_random
    with pytest.raises(TypeError, match="MALA has no pure step update"):
        mala.update(torch.zeros(1), torch.zeros(1))

    class Halving(Sampler):
        """A user's sampler: declaring a pure step is all the compiled and unrolled paths need."""

        n_steps = 1

        @property
        def has_pure_step(self) -> bool:
            return True

        def update(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            return x - 0.5 * grad

    from jemkit.sampling.compiled import resolve_compile_mode

    assert resolve_compile_mode(True, Halving(), torch.nn.Identity(), "eval") == "default"
    with pytest.raises(ValueError, match="MALA has none"):
        resolve_compile_mode(True, mala, torch.nn.Identity(), "eval")
    with pytest.raises(ValueError, match="YOPO"):
        resolve_compile_mode(True, yopo, torch.nn.Identity(), "eval")


def test_rms_scaled_steps_move_every_chain_by_the_step_whatever_the_energys_scale():
    x0 = torch.rand(32, 2) * 1.2 - 0.6  # inside the box: no clamping on the first step
    sampler = PYLD(n_steps=1, step_size=0.05, scale="rms")
    moved = sampler.sample(quadratic_energy, x0) - x0
    rms = moved.square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full((32,), 0.05))  # each chain: 0.05 on average over its coordinates
    # the direction is the gradient's, and an energy 1,000 times as steep (or as flat) gives the same chains
    grad = (x0 - MU) / SCALE**2
    assert (torch.nn.functional.cosine_similarity(-moved, grad, dim=1) > 0.9999).all()
    for factor in (1e-3, 1e3):
        torch.testing.assert_close(
            PYLD(5, 0.05, scale="rms").sample(lambda x, factor=factor: factor * quadratic_energy(x), x0),
            PYLD(5, 0.05, scale="rms").sample(quadratic_energy, x0),
        )
    clipped = PYLD(5, 0.05).sample(lambda x: 1e-3 * quadratic_energy(x), x0)  # JEM++'s step barely moves there
    assert (clipped - x0).abs().max() < 0.01  # where the rms step moved 5 x 0.05
    with pytest.raises(ValueError, match="unknown scale 'l1'; expected one of 'clip', 'rms'"):
        PYLD(scale="l1")
