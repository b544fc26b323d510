import copy
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from jemkit import JEM, PYLD, SGLD, GaussianInit, ReplayBuffer, UniformInit
from jemkit.optim import SAM
from jemkit.presets import PRESETS, preset_settings
from tests.conftest import TinyMLP
from tests.helpers import toy_loader, trainer


def test_a_preset_fills_what_was_left_at_its_default_and_explicit_values_win():
    jem = JEM(TinyMLP(), preset="jempp")
    assert isinstance(jem.sampler, PYLD) and isinstance(jem.buffer.init, GaussianInit)
    assert jem.preset == "jempp" and jem.hparams.preset == "jempp"
    assert jem.hparams.sampler["class_path"] == "jemkit.sampling.langevin.PYLD"  # the resolved settings are recorded
    mine = JEM(TinyMLP(), preset="jempp", sampler=SGLD(n_steps=3), data_noise=0.0)
    assert isinstance(mine.sampler, SGLD) and mine.sampler.n_steps == 3 and mine.data_noise == 0.0
    assert isinstance(mine.buffer.init, GaussianInit)  # what was not given still comes from the preset
    paper = JEM(TinyMLP(), preset="jem")
    assert (paper.sampler.n_steps, paper.lr, paper.lr_warmup_steps, paper.data_noise) == (20, 1e-4, 1000, 0.03)


def test_an_explicit_value_equal_to_the_default_wins_over_the_preset():
    jem = JEM(TinyMLP(), preset="jempp", weights={"px": 0.05}, lr=1e-3)  # 0.05 is jemkit's default px weight
    assert jem.weights["px"] == 0.05 and jem.hparams.weights["px"] == 0.05
    merged = JEM(TinyMLP(), preset="jem", weights={"energy_l2": 0.5})  # weights merge key by key
    assert merged.weights == {"ce": 1.0, "px": 1.0, "pxy": 0.0, "energy_l2": 0.5, "margin": 0.0}


def test_a_subclass_with_a_preset_initialises_once_and_records_its_settings_once(monkeypatch):
    calls = {"init": 0, "save": 0}
    save = JEM.save_hyperparameters

    def counted_save(self, *args, **kwargs):
        calls["save"] += 1
        return save(self, *args, **kwargs)

    monkeypatch.setattr(JEM, "save_hyperparameters", counted_save)

    class MyJEM(JEM):
        def __init__(self, classifier, preset="jempp", **kwargs):
            calls["init"] += 1
            super().__init__(classifier, preset=preset, **kwargs)

    jem = MyJEM(TinyMLP())
    assert calls == {"init": 1, "save": 1}
    assert jem.hparams_initial.weights["px"] == 1.0 and jem.hparams.sampler["class_path"].endswith("PYLD")


def test_a_buffer_given_without_restarts_gets_the_defaults_or_the_presets():
    from jemkit.presets import default_restarts

    sized = JEM(TinyMLP(), buffer=ReplayBuffer(capacity=500, storage="uint8"))
    assert sized.buffer.capacity == 500 and sized.buffer.storage == "uint8"
    assert repr(sized.buffer.init) == repr(default_restarts(TinyMLP()))  # the restarts the defaults were chosen with
    assert isinstance(JEM(TinyMLP(), preset="jem", buffer=ReplayBuffer(capacity=500)).buffer.init, UniformInit)
    chosen = UniformInit(-0.5, 0.5)
    assert JEM(TinyMLP(), buffer=ReplayBuffer(init=chosen)).buffer.init is chosen  # a choice is kept


def test_presets_give_fresh_objects_and_unknown_names_are_refused():
    first, second = preset_settings("jempp"), preset_settings("jempp")
    assert first["sampler"] is not second["sampler"] and first["buffer"] is not second["buffer"]
    with pytest.raises(ValueError, match=r"unknown preset 'jem\+\+'; expected one of 'finetune', 'jem', 'jempp'"):
        JEM(TinyMLP(), preset="jem++")
    assert set(PRESETS) >= {"jem", "jempp", "sada"}


def test_a_preset_run_reloads_from_its_checkpoint_with_the_same_settings(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    jem = JEM(TinyMLP(), preset="jempp", buffer=ReplayBuffer(capacity=30, init=GaussianInit(fit_batches=2)))
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt]).fit(jem, toy_loader())
    loaded = JEM.load_from_checkpoint(tmp_path / "last.ckpt", classifier=TinyMLP())
    assert loaded.preset == "jempp" and repr(loaded.sampler) == repr(jem.sampler)
    assert loaded.buffer.capacity == 30 and torch.equal(loaded.buffer.init.means, jem.buffer.init.means)


class CountDraws(Callback):
    def __init__(self):
        self.draws, self.steps = 0, 0

    def on_train_start(self, trainer, pl_module):
        draw = pl_module.chains.draw

        def counted(*args, **kwargs):
            self.draws += 1
            return draw(*args, **kwargs)

        pl_module.chains.draw = counted

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps += 1


def test_sam_evaluates_each_step_twice_on_the_same_samples_and_trains(tmp_path):
    torch.manual_seed(0)
    count = CountDraws()
    jem = JEM(
        TinyMLP(),
        sampler=SGLD(n_steps=2, step_size=0.1),
        buffer=ReplayBuffer(capacity=32),
        optimizer=partial(SAM, base="adam", rho=0.05, lr=1e-2),
    )
    calls = []
    original = jem.training_step

    def recorded(batch, batch_idx):
        loss = original(batch, batch_idx)
        calls.append(float(jem.step_stats["ce"]))
        return loss

    jem.training_step = recorded
    trainer(tmp_path, max_steps=40, callbacks=[count]).fit(jem, toy_loader())
    assert count.steps == 40 and count.draws == 40  # one draw per step, reused by SAM's second evaluation
    assert len(calls) == 80
    first, last = sum(calls[:8]) / 8, sum(calls[-8:]) / 8
    assert last < 0.7 * first, (first, last)  # the cross-entropy went down (1.08 -> 0.59 here): SAM trains
    assert calls[1] != calls[0]  # the second evaluation is at the perturbed weights


def test_the_sada_preset_uses_sam():
    jem = JEM(TinyMLP(), preset="sada")
    optimizer = jem.configure_optimizers()
    assert isinstance(optimizer, SAM) and isinstance(optimizer.base, torch.optim.Adam)
    assert jem.sampler.n_steps == 5


def test_sam_step_is_the_base_step_with_the_gradient_at_the_ascent_point():
    torch.manual_seed(0)
    a = torch.tensor([[3.0, 0.5], [0.5, 1.0]])
    w0 = torch.tensor([1.0, -2.0])
    w = torch.nn.Parameter(w0.clone())
    optimizer = SAM([w], base="sgd", rho=0.1, lr=0.05)

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    optimizer.step(closure)
    g = a @ w0
    ascent = w0 + 0.1 * g / g.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.05 * (a @ ascent))
    adaptive = torch.nn.Parameter(w0.clone())
    optimizer = SAM([adaptive], base="sgd", rho=0.1, adaptive=True, lr=0.05)

    def closure_adaptive():
        optimizer.zero_grad()
        loss = 0.5 * adaptive @ a @ adaptive
        loss.backward()
        return loss

    optimizer.step(closure_adaptive)
    scaled = w0.abs() * g
    ascent = w0 + 0.1 * w0.square() * g / scaled.norm()
    torch.testing.assert_close(adaptive.detach(), w0 - 0.05 * (a @ ascent))
    state = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(state)
    assert optimizer.base.param_groups is optimizer.param_groups


def test_sam_errors():
    w = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="rho must be > 0"):
        SAM(w, rho=0.0)
    with pytest.raises(ValueError, match="unknown base optimiser 'lion'"):
        SAM(w, base="lion")
    with pytest.raises(ValueError, match="momentum is an SGD setting"):
        SAM(w, base="adam", momentum=0.9)
    with pytest.raises(ValueError, match="needs a closure"):
        SAM(w).step()


def _train_on_digits(tmp_path, jem: JEM, steps: int) -> dict[str, float]:
    """Train on digits for ``steps``; test accuracy, ECE and the log p(x) AUROC against uniform noise."""
    from jemkit import DigitsDataModule
    from jemkit.data.ood import UniformNoise
    from jemkit.metrics import CalibrationMetrics, ood_metrics
    from jemkit.ood.scores import score_batches

    dm = DigitsDataModule(batch_size=64)
    trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(jem, dm)
    jem.eval()
    x, y = dm.test_dataset.tensors
    calibration = CalibrationMetrics()
    with torch.no_grad():
        calibration.update(jem(x), y)
    result = {k: float(v) for k, v in calibration.compute().items()}
    loader = partial(torch.utils.data.DataLoader, batch_size=256)
    data = score_batches(jem, loader(dm.test_dataset), ["logpx"])["logpx"]
    noise = score_batches(jem, loader(UniformNoise(len(x), dm.input_shape, seed=0)), ["logpx"])["logpx"]
    return result | {"auroc_noise": float(ood_metrics(data, noise)["auroc"])}


@pytest.mark.slow
@pytest.mark.parametrize("preset", [None, "jempp"])
def test_the_defaults_and_jempp_train_a_digits_jem_to_a_measured_level(tmp_path, preset):
    # The comparison with the plain classifier (3 seeds, 1,500 steps) is benchmarks/quality.py. Here 400 steps, seed 0,
    # measured: plain cross-entropy 0.956 accuracy, ECE 2.8%, AUROC 0.986 against noise; the defaults 0.963, ECE 9.3%
    # (still under-confident this early: the gap closes by 1,500 steps), AUROC 0.999; the paper's lr gives ECE > 25%.
    torch.manual_seed(0)
    from jemkit.models import SmallCNN

    result = _train_on_digits(tmp_path, JEM(SmallCNN(width=16), preset=preset), steps=400)
    assert result["acc"] > 0.93, result
    assert result["auroc_noise"] > 0.98, result
    if preset is None:  # jempp's full log p(x) term is more under-confident than the defaults' 0.1
        assert result["ece"] < 0.12, result


def test_the_rows_preset_is_the_0_3_defaults_with_box_restarts_for_batchnorm():
    """jemkit 0.3's defaults, which measured better on rows and signals: clipped steps of 0.2, px 0.1, half of the
    restarts from the box; a BatchNorm classifier restarts from the box only, as with the defaults."""
    jem = JEM(TinyMLP(), preset="rows")
    assert (jem.sampler.step_size, jem.sampler.scale, jem.weights["px"]) == (0.2, "clip", 0.1)
    assert isinstance(jem.buffer.init, GaussianInit) and jem.buffer.init.uniform_fraction == 0.5
    with_bn = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    assert isinstance(JEM(with_bn, preset="rows").buffer.init, UniformInit)
    assert JEM(TinyMLP()).buffer.init.uniform_fraction == 0.2  # the defaults keep theirs
