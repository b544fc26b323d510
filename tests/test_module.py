import math
import warnings
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from jemkit import JEM, SGLD, DivergenceError, GaussianMixtureDataModule, InputDomain, ReplayBuffer
from tests.conftest import TinyMLP
from tests.helpers import KeepStart, ZeroInit, loader, toy_loader, trainer


class GaussianClassifier(nn.Module):
    """logits_c = -|x - mu_c|^2 / (2 s^2): E(x, c) is the energy of N(mu_c, s^2 I)."""

    def __init__(self, means: torch.Tensor, std: float) -> None:
        super().__init__()
        self.means = nn.Parameter(means.clone())
        self.std = std

    def forward(self, x):
        return -(torch.cdist(x, self.means) ** 2) / (2 * self.std**2)


# ----------------------------------------------------------------------------- wrapping
def test_resnet18_wraps_in_one_line_and_trains_with_plain_trainer(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    classifier = torchvision.models.resnet18(num_classes=10)
    jem = JEM(classifier)
    sampler = jem.sampler
    assert type(sampler).__name__ == "PYLD" and (sampler.n_steps, sampler.step_size, sampler.scale) == (5, 0.05, "rms")
    assert (jem.buffer.capacity, jem.buffer.reinit_prob, type(jem.buffer.init).__name__) == (
        10_000,
        0.05,
        "UniformInit",  # BatchNorm: chains restart from the input box (presets.default_restarts)
    )
    assert jem.chains.sampling_mode == "train"  # "auto" with BatchNorm
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8)
    bn = classifier.bn1
    running_before = bn.running_mean.clone()
    trainer(tmp_path, max_steps=1).fit(jem, loader(x, y, batch_size=8))
    assert jem.buffer.input_shape == (3, 32, 32) and jem.num_classes == 10
    assert not torch.equal(bn.running_mean, running_before)  # the data forward updates running statistics
    torch.testing.assert_close(jem(x[:2]), classifier(x[:2]))  # forward is the classifier's


def test_forward_returns_classifier_logits(tiny_mlp):
    jem = JEM(tiny_mlp)
    x = torch.randn(4, 2)
    assert torch.equal(jem(x), tiny_mlp(x))


def test_training_learns_classes_and_the_px_term_learns_density(tmp_path):
    """Same run with and without the generative term: only with it does log p(x) tell data from uniform noise."""
    from jemkit.metrics.ood import ood_metrics

    dm = GaussianMixtureDataModule(num_classes=4, num_samples=800, batch_size=64)
    noise = torch.rand(2000, 2) * 2 - 1
    auroc = {}
    for px_weight in (0.0, 1.0):
        torch.manual_seed(0)
        jem = JEM(
            TinyMLP(num_classes=4, hidden=64),
            weights={"px": px_weight},
            buffer=ReplayBuffer(capacity=500),
            lr=1e-2,
            sampler=SGLD.from_temperature(n_steps=20, step_size=3e-3),
        )
        trainer(tmp_path, max_epochs=8, limit_val_batches=0).fit(jem, dm)
        assert trainer(tmp_path).test(jem, dm, verbose=False)[0]["test/acc"] > 0.95
        with torch.no_grad():
            scores = ood_metrics(-jem.energy(dm.test_dataset.tensors[0]), -jem.energy(noise))
        auroc[px_weight] = float(scores["auroc"])
    assert auroc[1.0] > auroc[0.0] + 0.2, auroc


def test_class_conditional_sampling_targets_class_gaussians():
    means = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    jem = JEM(
        GaussianClassifier(means, std=0.1),
        buffer=ReplayBuffer(capacity=100, reinit_prob=0.0, input_shape=(2,)),
        sampler=SGLD.from_temperature(n_steps=400, step_size=2e-4),
    )
    y = torch.tensor([0, 1]).repeat(2000)
    x = jem.sample(len(y), y=y, n_steps=jem.sampler.n_steps, source="fresh")
    for c in (0, 1):
        torch.testing.assert_close(x[y == c].mean(0), means[c], atol=0.01, rtol=0)
        torch.testing.assert_close(x[y == c].std(0), torch.tensor([0.1, 0.1]), rtol=0.08, atol=0)


def test_sample_leaves_buffer_parameters_and_batchnorm_untouched():
    model = TinyMLP(batchnorm=True)
    jem = JEM(model, buffer=ReplayBuffer(capacity=50, input_shape=(2,)))
    buffer_before = jem.buffer.samples.clone()
    bn = model.net[2]
    stats = bn.running_mean.clone(), bn.running_var.clone()
    with torch.inference_mode():  # callbacks may call it from validation
        x = jem.sample(16)
    assert x.shape == (16, 2) and not x.requires_grad
    assert torch.equal(jem.buffer.samples, buffer_before)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_batchnorm_running_stats_see_only_data(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP(batchnorm=True)
    reference = TinyMLP(batchnorm=True)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 2), torch.arange(16) % 3
    jem = JEM(model, data_noise=0.0, buffer=ReplayBuffer(capacity=64))
    trainer(tmp_path, max_steps=1).fit(jem, loader(x, y, batch_size=16))
    reference.train()
    reference(x)  # one data forward, as the JEM step should do
    torch.testing.assert_close(model.net[2].running_mean, reference.net[2].running_mean)
    torch.testing.assert_close(model.net[2].running_var, reference.net[2].running_var)


def test_pxy_term_uses_conditional_buffer_and_logs(tmp_path):
    logged = {}

    class Grab(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            logged.update(trainer.callback_metrics)

    jem = JEM(TinyMLP(), weights={"pxy": 1.0, "energy_l2": 0.1}, sampler=SGLD(n_steps=2))
    assert jem.buffer.conditional
    with pytest.raises(ValueError, match=r"weights\['pxy'\] > 0 samples per class: pass buffer=ReplayBuffer\(condit"):
        JEM(TinyMLP(), weights={"pxy": 1.0}, buffer=ReplayBuffer(capacity=30))
    jem = JEM(
        TinyMLP(),
        weights={"pxy": 1.0, "energy_l2": 0.1},
        sampler=SGLD(n_steps=2),
        buffer=ReplayBuffer(30, conditional=True),
    )
    trainer(tmp_path, max_steps=2, callbacks=[Grab()]).fit(jem, toy_loader())
    for key in [
        "train/loss",
        "train/ce",
        "train/px",
        "train/pxy",
        "train/energy_data",
        "train/energy_sample",
        "train/energy_gap",
        "train/acc",
    ]:
        assert key in logged and torch.isfinite(logged[key])


def test_validation_metrics_are_the_one_calibration_path_also_at_confidence_one(tmp_path):
    from jemkit.evaluate.calibration import calibration_report
    from jemkit.metrics import CalibrationMetrics, expected_calibration_error

    classifier = nn.Linear(2, 3)
    with torch.no_grad():  # large logits: some confidences are exactly 1.0 in float32, the edge binnings disagree on
        classifier.weight.copy_(torch.tensor([[40.0, 0.0], [0.0, 40.0], [-40.0, -40.0]]))
    x, y = torch.randn(40, 2), torch.arange(40) % 3
    logits = classifier(x).detach()
    assert (logits.softmax(1).max(1).values == 1.0).sum() >= 10
    jem = JEM(classifier, sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=30))
    metrics = trainer(tmp_path).validate(jem, loader(x, y, batch_size=16), verbose=False)[0]
    expected = CalibrationMetrics()
    expected.update(logits, y)
    expected = expected.compute()
    for key in ("acc", "nll", "ece", "brier", "mce"):
        torch.testing.assert_close(torch.tensor(metrics[f"val/{key}"]), expected[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expected["ece"], expected_calibration_error(logits.softmax(1), y))
    report = calibration_report(logits, y, n_bins=15)
    assert report["ece"] == pytest.approx(float(expected["ece"]), abs=1e-6)
    assert report["accuracy"] == pytest.approx(float(expected["acc"]), abs=1e-6)


def test_predict_returns_probabilities(tmp_path):
    jem = JEM(TinyMLP(), temperature=2.0)
    probs = torch.cat(trainer(tmp_path).predict(jem, DataLoader(torch.randn(10, 2), batch_size=4)))
    assert probs.shape == (10, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(10))


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_carries_buffer_and_resume_restores_it_exactly(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    jem = JEM(TinyMLP(), sampler=SGLD(n_steps=2), buffer=ReplayBuffer(capacity=40))
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(jem, toy_loader())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(saved["state_dict"]["buffer.samples"], jem.buffer.samples)
    assert saved["jemkit"]["input_shape"] == (2,) and saved["jemkit"]["num_classes"] == 3

    seen = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["buffer"] = pl_module.buffer.samples.clone()
            seen["weight"] = pl_module.classifier.net[1].weight.detach().clone()
            seen["step"] = trainer.global_step
            seen["adam"] = trainer.optimizers[0].state_dict()["state"][0]["exp_avg"].clone()

    resumed = JEM(TinyMLP(), sampler=SGLD(n_steps=2), buffer=ReplayBuffer(capacity=40))
    trainer(tmp_path, max_steps=5, callbacks=[Snapshot()]).fit(resumed, toy_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(seen["buffer"], saved["state_dict"]["buffer.samples"])
    assert torch.equal(seen["weight"], saved["state_dict"]["classifier.net.1.weight"])
    assert seen["step"] == 3
    assert torch.equal(seen["adam"], saved["optimizer_states"][0]["state"][0]["exp_avg"])

    loaded = JEM.load_from_checkpoint(tmp_path / "last.ckpt", classifier=TinyMLP())
    assert torch.equal(loaded.buffer.samples, saved["state_dict"]["buffer.samples"])
    assert loaded.num_classes == 3 and loaded.hparams.buffer["init_args"]["capacity"] == 40
    assert loaded.buffer.capacity == 40 and loaded.sampler.n_steps == 2


def test_checkpoint_of_other_class_count_is_refused(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(
        JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10)), toy_loader()
    )
    with pytest.raises(ValueError, match=r"3 classes but this JEM was built with 5"):
        JEM.load_from_checkpoint(tmp_path / "last.ckpt", classifier=TinyMLP(num_classes=5), num_classes=5)


def test_non_jemkit_checkpoint_is_refused(tmp_path):
    raw = tmp_path / "raw.pt"
    torch.save({"state_dict": TinyMLP().state_dict()}, raw)
    with pytest.raises(ValueError, match="not a Lightning checkpoint of a JEM"):
        JEM.load_from_checkpoint(raw, classifier=TinyMLP())

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.classifier = TinyMLP()

    tr = trainer(tmp_path, max_steps=0)
    tr.strategy.connect(Plain())
    tr.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not written by a jemkit JEM"):
        JEM.load_from_checkpoint(tmp_path / "plain.ckpt", classifier=TinyMLP())


# ----------------------------------------------------------------------------- bad input
class WrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x):
        return self.lin(x)[:, :, None]


@pytest.mark.parametrize(
    ("model", "x", "y", "error", "match"),
    [
        (WrongShape(), torch.randn(8, 2), torch.zeros(8, dtype=torch.long), ValueError, r"logits of shape \[B, C\]"),
        (TinyMLP(), torch.randn(8, 2), torch.full((8,), 3), ValueError, r"labels must lie in \[0, 3\).*\[3, 3\]"),
        (TinyMLP(), torch.randn(8, 2), torch.full((8,), -1), ValueError, r"labels in \[-1, -1\]"),
        (TinyMLP(), torch.randn(8, 2), torch.full((8,), 0.5), ValueError, "not a whole number"),
    ],
)
def test_bad_first_batch_gives_clear_error(tmp_path, model, x, y, error, match):
    with pytest.raises(error, match=match):
        trainer(tmp_path, max_steps=1).fit(JEM(model, buffer=ReplayBuffer(capacity=10)), loader(x, y))


def test_input_shape_mismatch(tmp_path):
    jem = JEM(TinyMLP(in_features=4), buffer=ReplayBuffer(capacity=10, input_shape=(2, 2)))
    with pytest.raises(ValueError, match=r"shape \(4,\) per sample, expected \(2, 2\)"):
        trainer(tmp_path, max_steps=1).fit(jem, loader(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)))


def test_num_classes_mismatch(tmp_path):
    with pytest.raises(ValueError, match="returns 3 logits but num_classes=5"):
        trainer(tmp_path, max_steps=1).fit(
            JEM(TinyMLP(), num_classes=5, buffer=ReplayBuffer(capacity=10)), toy_loader()
        )


def test_divergence_stops_with_named_quantity_and_no_checkpoint(tmp_path):
    model = TinyMLP()
    with torch.no_grad():
        model.net[-1].weight.fill_(float("inf"))
    ckpt_dir = tmp_path / "ckpt"
    tr = trainer(
        tmp_path,
        max_steps=3,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)],
    )
    with pytest.raises(DivergenceError, match=r"diverged at global step 0: .*energy_data=(nan|-?inf) \(non-finite\)"):
        tr.fit(JEM(model, sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10)), toy_loader())
    assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": {"px": -1.0}}, "weight 'px' must be a finite number >= 0"),
        ({"weights": {"pz": 1.0}}, r"unknown objective weight\(s\) \['pz'\]"),
        ({"margins": (0.0, -1.0)}, "margin_in < margin_out"),
        ({"temperature": 0.0}, "temperature"),
        ({"num_classes": 1}, "num_classes"),
        ({"sampling_mode": "batch"}, "sampling_mode"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps must be an integer >= 0"),
        ({"lr_warmup_steps": 2.5}, "lr_warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JEM(TinyMLP(), **kwargs)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        JEM(lambda x: x)


# ----------------------------------------------------------------------------- adapters at the module level
class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TinyMLP()

    def forward(self, x):
        return {"logits": self.body(x), "features": x}


def test_classifier_returning_a_dict_needs_output_key(tmp_path):
    with pytest.raises(TypeError, match=r"dict with keys \['logits', 'features'\]: pass output_key"):
        trainer(tmp_path, max_steps=1).fit(JEM(DictOutput(), buffer=ReplayBuffer(capacity=10)), toy_loader())
    jem = JEM(DictOutput(), output_key="logits", sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10))
    trainer(tmp_path, max_steps=1).fit(jem, toy_loader())
    assert jem(torch.zeros(2, 2)).shape == (2, 3)


def test_data_outside_a_declared_domain_warns_with_the_observed_range_and_a_fix(tmp_path):
    x = torch.rand(16, 2) * 255
    jem = JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10), domain=InputDomain(-1, 1))
    with pytest.warns(
        UserWarning,
        match=r"training inputs lie in \[.*, 2\d\d.*\] but the declared InputDomain\(low=-1, "
        r"high=1\).* leave domain unset .* or declare InputDomain\(low=.*, high=2\d\d",
    ):
        trainer(tmp_path, max_steps=2).fit(jem, loader(x, torch.arange(16) % 3))


def test_undeclared_domain_is_fitted_so_chains_stay_in_the_data_box(tmp_path):
    x = torch.rand(64, 2) * 255
    jem = JEM(TinyMLP(), buffer=ReplayBuffer(capacity=32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*val_dataloader.*|.*does not have many workers.*")
        warnings.filterwarnings("ignore", message="The training inputs span")  # advice on the classifier's inputs
        trainer(tmp_path, max_steps=3).fit(jem, loader(x, torch.arange(64) % 3))
    samples = jem.sample(32)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 255.0
    assert float(samples.std()) > 10  # spread over the box, not stuck near [-1, 1]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(
        JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10)), toy_loader()
    )
    with pytest.raises(ValueError, match="holds a TinyMLP classifier but this JEM wraps a DictOutput"):
        JEM.load_from_checkpoint(tmp_path / "last.ckpt", classifier=DictOutput(), output_key="logits")
    with pytest.raises(ValueError, match="weights do not fit this JEM's classifier"):
        JEM.load_from_checkpoint(tmp_path / "last.ckpt", classifier=TinyMLP(hidden=7))


def test_batch_of_one_with_batchnorm_passes_the_first_batch_checks(tmp_path):
    jem = JEM(TinyMLP(batchnorm=True), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10), weights={"px": 0.0})
    one = loader(torch.randn(1, 2), torch.zeros(1, dtype=torch.long), batch_size=1)
    trainer(tmp_path).validate(jem, one, verbose=False)
    assert jem.num_classes == 3 and jem.buffer.input_shape == (2,)


def test_informative_init_is_fitted_on_training_data_and_checkpointed(tmp_path):
    from jemkit import DigitsDataModule, GaussianInit

    dm = DigitsDataModule(batch_size=64)
    jem = JEM(
        TinyMLP(in_features=64, num_classes=10),
        sampler=SGLD(n_steps=1),
        buffer=ReplayBuffer(capacity=200, init=GaussianInit(fit_batches=10)),
    )
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[ckpt_cb], limit_val_batches=0).fit(jem, dm)
    init = jem.buffer.init
    assert init.is_fitted and init.means.shape == (10, 1, 8, 8)
    dm.setup("fit")
    x, y = dm.train_dataset.tensors
    torch.testing.assert_close(init.means[3], x[y == 3].mean(0), atol=0.15, rtol=0)  # 640 of 1257 images seen
    # fresh chains start near the class means: closer to them than uniform noise is
    fresh = init.sample(500, (1, 8, 8), y=torch.full((500,), 3))
    assert (fresh.mean(0) - init.means[3]).abs().mean() < 0.05
    loaded = JEM.load_from_checkpoint(tmp_path / "last.ckpt", classifier=TinyMLP(in_features=64, num_classes=10))
    assert isinstance(loaded.buffer.init, GaussianInit) and loaded.buffer.init.fit_batches == 10
    assert torch.equal(loaded.buffer.init.means, init.means)


class RecordLR(pl.Callback):
    """The learning rate the optimiser actually uses (read inside the optimiser step, after the warm-up factor)."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("scheduler", "epoch_lrs"),
    [
        (partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), [0.1, 0.05]),
        # LambdaLR sets the rate outright instead of chaining: the warm-up must still apply on top of it
        (partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda epoch: 0.5**epoch), [0.1, 0.05]),
    ],
)
def test_lr_warmup_is_linear_per_step_and_composes_with_any_epoch_schedule(tmp_path, scheduler, epoch_lrs):
    record = RecordLR()
    jem = JEM(
        TinyMLP(),
        sampler=SGLD(n_steps=1),
        buffer=ReplayBuffer(capacity=32),
        lr=0.1,
        lr_warmup_steps=6,
        lr_scheduler=scheduler,
    )
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[record],
        default_root_dir=tmp_path,
    )
    trainer.fit(jem, toy_loader(n=64, batch_size=16))  # 4 steps per epoch
    warm = [(k + 1) / 6 for k in range(6)]
    expected = [epoch_lrs[0] * f for f in warm[:4]] + [epoch_lrs[1] * f for f in warm[4:]] + [epoch_lrs[1]] * 2
    expected += [0.025] * 4  # epoch 2: warm-up over, the schedule alone
    torch.testing.assert_close(torch.tensor(record.lrs), torch.tensor(expected), rtol=1e-6, atol=0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125)  # the schedule alone, after 3 epochs


@pytest.mark.parametrize(
    ("ce_weight", "px_weight", "pxy_weight", "energy_l2_weight"),
    [(1.0, 1.0, 0.0, 0.0), (0.5, 2.0, 0.0, 0.3), (1.0, 0.0, 1.5, 0.0), (0.2, 0.7, 1.3, 0.1), (0.0, 1.0, 1.0, 1.0)],
)
def test_the_loss_is_the_weighted_sum_of_its_terms_on_fixed_samples(ce_weight, px_weight, pxy_weight, energy_l2_weight):
    # A bias-free linear classifier gives samples at the origin the logits 0: E(x_q) = -log C and E(x_q, y_q) = 0
    # whatever the random labels y_q, so every term has a closed form.
    torch.manual_seed(0)
    weight = torch.randn(3, 2)
    classifier = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        classifier.weight.copy_(weight)
    temperature = 2.0
    jem = JEM(
        classifier,
        weights={"ce": ce_weight, "px": px_weight, "pxy": pxy_weight, "energy_l2": energy_l2_weight},
        data_noise=0.0,
        temperature=temperature,
        sampler=KeepStart(),
        buffer=ReplayBuffer(capacity=9, reinit_prob=1.0, init=ZeroInit(), conditional=True, num_classes=3),
    )
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step called without a Trainer
        loss = jem.training_step((x, y), 0)
    logits = x @ weight.T
    e_data = -temperature * torch.logsumexp(logits / temperature, 1)
    e_sample = torch.full((6,), -temperature * math.log(3.0))
    terms = {
        "ce": torch.nn.functional.cross_entropy(logits / temperature, y),  # p(y|x) at the module's temperature
        "px": e_data.mean() - e_sample.mean(),
        "pxy": (-logits.gather(1, y[:, None]) / temperature).mean() - 0.0,
        "l2": e_data.square().mean() + e_sample.square().mean(),
    }
    expected = ce_weight * terms["ce"]
    if px_weight > 0:
        expected = expected + px_weight * terms["px"] + energy_l2_weight * terms["l2"]
    expected = expected + pxy_weight * terms["pxy"]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    stats = jem.step_stats
    torch.testing.assert_close(stats["ce"], terms["ce"])
    torch.testing.assert_close(stats["energy_data"], e_data.mean())
    if px_weight > 0:
        torch.testing.assert_close(stats["px"], terms["px"])
        torch.testing.assert_close(stats["energy_gap"], e_sample.mean() - e_data.mean())
        torch.testing.assert_close(stats["sample_norm"], torch.tensor(0.0))
    if pxy_weight > 0:
        torch.testing.assert_close(stats["pxy"], terms["pxy"])


@pytest.mark.parametrize("spec", ["hinge", {"name": "hinge", "margin": 0.5}, {"name": "square-square"}, "log"])
def test_an_ebm_loss_can_be_the_classification_term(spec):
    from jemkit.losses import get_ebm_loss

    classifier = nn.Linear(2, 3)
    jem = JEM(classifier, classification_loss=spec, weights={"px": 0.0}, data_noise=0.0, temperature=0.5)
    x, y = torch.randn(8, 2), torch.arange(8) % 3
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        loss = jem.training_step((x, y), 0)
    name, kwargs = (
        (spec, {}) if isinstance(spec, str) else (spec["name"], {k: v for k, v in spec.items() if k != "name"})
    )
    expected = get_ebm_loss(name, **kwargs)(-classifier(x) / 0.5, y)
    torch.testing.assert_close(loss, expected)


def test_classification_loss_errors():
    with pytest.raises(ValueError, match=r"unknown EBM loss 'hinj'; valid names: .*hinge"):
        JEM(TinyMLP(), classification_loss="hinj")
    with pytest.raises(ValueError, match="needs a 'name' key"):
        JEM(TinyMLP(), classification_loss={"margin": 1.0})
    with pytest.raises(ValueError, match="loss 'hinge' got unexpected argument"):
        JEM(TinyMLP(), classification_loss={"name": "hinge", "beta": 2.0})


def test_untrustworthy_checkpoints_are_named(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(
        JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10)), toy_loader()
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved["state_dict"]["buffer.samples"][[2, 7], 0] = float("nan")
    torch.save(saved, tmp_path / "poisoned.ckpt")
    with pytest.warns(RuntimeWarning, match=r"buffer.samples held 2 non-finite chains .* re-initialised"):
        loaded = JEM.load_from_checkpoint(tmp_path / "poisoned.ckpt", classifier=TinyMLP())
    assert torch.isfinite(loaded.buffer.samples).all()
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.ckpt is truncated or corrupted"):
        JEM.load_from_checkpoint(tmp_path / "truncated.ckpt", classifier=TinyMLP())
