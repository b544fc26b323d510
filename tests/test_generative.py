"""FID and IS of a JEM's samples: the metrics' behaviour on known sets, the feature networks, the sample sources,
the callback and the ``jemkit evaluate`` integration. Offline: features come from small networks, never Inception."""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.error import URLError

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import jemkit.metrics.generative as generative
from jemkit import JEM, ReplayBuffer
from jemkit.callbacks import GenerativeMonitor
from jemkit.evaluate import format_report
from jemkit.metrics.generative import (
    ClassifierLogits,
    GenerativeOptions,
    PenultimateFeatures,
    fid_score,
    generative_metrics,
    inception_images,
    inception_score,
    resolve_judge,
)
from jemkit.models import SmallCNN
from jemkit.sampling import PYLD
from tests.helpers import TinyMLP

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "jem-digits.ckpt"


class Features(nn.Module):
    """A fixed random projection to 8 features: a small stand-in for Inception."""

    num_features = 8

    def __init__(self, in_features: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1))


def tiny_jem(**kwargs) -> JEM:
    buffer = ReplayBuffer(capacity=64, input_shape=(1, 8, 8))
    return JEM(SmallCNN(width=8), sampler=PYLD(n_steps=2, step_size=0.2), buffer=buffer, **kwargs)


def real_loader(n: int = 48, batch_size: int = 16) -> DataLoader:
    x = torch.rand(n, 1, 8, 8) * 2 - 1
    return DataLoader(TensorDataset(x, torch.arange(n) % 10), batch_size=batch_size)


# ----------------------------------------------------------------------------- the metrics
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_mean_shift():
    x = torch.randn(400, 16)
    features = Features()
    with torch.no_grad():
        scale = features(x).var(0).sum().item()  # trace of the feature covariance
    assert abs(fid_score(x, x, features)) < 1e-3 * scale
    shifts = [0.1, 0.3, 1.0, 3.0]
    fids = [fid_score(x, x + shift, features) for shift in shifts]
    assert fids == sorted(fids) and fids[0] > 1e-3 * scale
    # Same covariance, mean moved by shift * W @ 1: FID is exactly the squared feature shift.
    with torch.no_grad():
        expected = [(features.proj.weight.sum(1) * s).square().sum().item() for s in shifts]
    assert fids == pytest.approx(expected, rel=1e-3)


def test_fid_reads_the_feature_size_of_a_network_without_num_features():
    x = torch.randn(100, 3, 5, 5)  # an input shape Inception could never take
    assert fid_score(x.split(32), x.split(50), nn.Flatten()) == pytest.approx(0.0, abs=1e-3)
    assert fid_score(x, x * 2, nn.Flatten()) > 1.0


def test_inception_score_counts_the_confidently_predicted_classes():
    n, k = 1000, 4
    one_class = F.one_hot(torch.zeros(n, dtype=torch.long), 10).float() * 30
    mean, std = inception_score(one_class, nn.Identity(), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-3) and std < 1e-3
    spread = F.one_hot(torch.arange(n) % k, 10).float() * 30  # k classes, equally often, each predicted surely
    mean, _ = inception_score(spread, nn.Identity(), splits=2)
    assert mean == pytest.approx(k, rel=0.02)
    unsure = torch.zeros(n, 10)  # uniform p(y|x): no information, IS 1 however many classes
    assert inception_score(unsure, nn.Identity(), splits=2)[0] == pytest.approx(1.0, abs=1e-4)
    # The splits are drawn with a fixed seed: equal on every DDP rank, and the caller's random stream is untouched.
    mixed = spread[:999] + torch.randn(999, 10)
    state = torch.random.get_rng_state()
    assert inception_score(mixed, nn.Identity(), splits=3) == inception_score(mixed, nn.Identity(), splits=3)
    assert torch.equal(torch.random.get_rng_state(), state)


# ----------------------------------------------------------------------------- feature networks
def test_penultimate_features_are_the_last_linear_input_and_leave_batchnorm_alone():
    classifier = TinyMLP(in_features=2, hidden=16, batchnorm=True)
    classifier.train()
    bn = classifier.net[2]
    running = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    features = PenultimateFeatures(classifier)
    assert features.num_features == 16
    x = torch.randn(32, 2)
    out = features(x)
    assert out.shape == (32, 16) and not out.requires_grad
    classifier.eval()
    expected = classifier.net[:4](x)  # Flatten, Linear, BatchNorm (running statistics), SiLU
    classifier.train()
    torch.testing.assert_close(out, expected)
    for before, after in zip(running, (bn.running_mean, bn.running_var, bn.num_batches_tracked), strict=True):
        assert torch.equal(before, after)
    assert classifier.training and bn.training  # the train flags come back
    assert not classifier.net[-1]._forward_pre_hooks  # no hook left behind on the user's classifier


def test_penultimate_features_of_a_named_layer_and_without_linear():
    cnn = SmallCNN(width=4)
    features = PenultimateFeatures(cnn, layer=cnn.features[-1], num_features=16)  # the Flatten's input [B, 16, 1, 1]
    assert features(torch.randn(3, 1, 8, 8)).shape == (3, 16)
    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear layer .* e.g. layer='1'"):
        PenultimateFeatures(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(ValueError, match="not a submodule"):
        PenultimateFeatures(cnn, layer=nn.Linear(2, 2))


def test_classifier_logits_of_a_jem_are_float_logits_in_eval_mode():
    jem = tiny_jem()
    jem.train()
    x = torch.rand(4, 1, 8, 8)
    logits = ClassifierLogits(jem)(x)
    assert logits.dtype == torch.float32 and logits.shape == (4, 10) and jem.training
    with torch.no_grad():
        torch.testing.assert_close(logits, jem.eval()(x))
    torch.testing.assert_close(ClassifierLogits(jem, temperature=2.0)(x), logits / 2)


def test_inception_images_are_rgb_in_unit_range():
    grey = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    rgb = inception_images(grey)
    assert rgb.shape == (1, 3, 2, 2) and rgb[0, :, 0, 1].tolist() == [0.5] * 3 and rgb.max() == 1.0
    with pytest.raises(ValueError, match='feature="self"'):
        inception_images(torch.zeros(4, 2))


# ----------------------------------------------------------------------------- samples of a JEM
def test_generative_metrics_reports_both_sources_with_counts_and_steps():
    jem = tiny_jem()
    jem.train()
    buffer_before = jem.buffer.samples.clone()
    section = generative_metrics(jem, real_loader(), num_samples=24, fresh_steps=3, batch_size=10, splits=2)
    assert section["feature"] == "self" and section["is_feature"] == "self" and section["num_real"] == 24
    assert section["buffer"]["num_samples"] == 24 and section["buffer"]["steps"] == 2
    assert section["fresh"]["num_samples"] == 24 and section["fresh"]["steps"] == 3
    for source in ("buffer", "fresh"):
        assert math.isfinite(section[source]["fid"]) and section[source]["fid"] >= -1e-3
        assert 1.0 - 1e-4 <= section[source]["is_mean"] <= 10.0
    assert jem.training and jem.classifier.training  # the caller's mode comes back
    assert torch.equal(jem.buffer.samples, buffer_before) and jem.buffer.reinit_prob == 0.05
    assert section["init"]["num_samples"] == 24 and section["init"]["steps"] == 0  # where the chains start
    default = generative_metrics(jem, real_loader(8), num_samples=8, sources=["fresh"], splits=1)
    assert default["fresh"]["steps"] == 10 and "buffer" not in default  # 5x the sampler's steps
    assert default["num_real"] == 8


def test_generative_metrics_with_a_user_feature_network_and_bad_arguments():
    jem = tiny_jem()
    section = generative_metrics(jem, real_loader(), num_samples=16, sources=["buffer"], feature=nn.Flatten())
    assert section["feature"] == "Flatten" and section["is_feature"] == "self" and section["num_real"] == 16
    with pytest.raises(ValueError, match=r"unknown sample source\(s\) \['replay'\]"):
        generative_metrics(jem, real_loader(), num_samples=8, sources=["replay"])
    with pytest.raises(ValueError, match="feature must be"):
        generative_metrics(jem, real_loader(), num_samples=8, feature="vgg")


def test_inception_without_torch_fidelity_names_the_extra(monkeypatch):
    monkeypatch.setattr("torchmetrics.utilities.imports._TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "jemkit\[fid\]"'):
        generative_metrics(tiny_jem(), real_loader(), num_samples=8, feature="inception")


def test_inception_weights_that_cannot_be_downloaded_are_named(monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchmetrics.utilities.imports._TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(generative, "FrechetInceptionDistance", offline)
    with pytest.raises(RuntimeError, match=r"internet.*feature=\"self\"") as info:
        generative_metrics(tiny_jem(), real_loader(), num_samples=8, feature="inception")
    assert isinstance(info.value.__cause__, URLError)


def test_a_judge_measures_the_samples_beside_their_start_and_held_out_data(tmp_path):
    jem = tiny_jem()
    real = real_loader(48)
    torch.manual_seed(3)
    own = generative_metrics(jem, real, num_samples=24, splits=2, heldout=real)
    torch.manual_seed(3)
    judged = generative_metrics(jem, real, num_samples=24, splits=2, heldout=real, judge=jem)
    # the JEM judging itself through `judge` is `feature="self"`: the same features, the same softmax
    for source in ("buffer", "fresh", "init", "data"):
        assert judged[source]["fid"] == pytest.approx(own[source]["fid"], rel=1e-4, abs=1e-4)
        assert judged[source]["is_mean"] == pytest.approx(own[source]["is_mean"], rel=1e-4)
    assert judged["feature"] == judged["is_feature"] == "judge SmallCNN"
    assert judged["init"]["steps"] == 0 and judged["data"]["steps"] is None
    assert abs(judged["data"]["fid"]) < 1e-2  # held-out data that is the real data: the floor is zero
    other = SmallCNN(width=4)
    torch.save(other.state_dict(), tmp_path / "judge.pt")  # weights of another architecture (width 4; the JEM: 8)
    with pytest.raises(ValueError, match="do not fit"):
        resolve_judge(str(tmp_path / "judge.pt"), jem)
    torch.save(jem.classifier.state_dict(), tmp_path / "same.pt")
    loaded = resolve_judge(str(tmp_path / "same.pt"), jem)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), jem.eval()(x))
    with pytest.raises(ValueError, match="not a `jemkit fit` checkpoint"):
        resolve_judge(str(tmp_path / "same.pt"), None)


# ----------------------------------------------------------------------------- callback and report
def test_generative_monitor_logs_fid_and_is_after_a_training_epoch(tmp_path):
    jem = JEM(SmallCNN(width=8), sampler=PYLD(n_steps=2, step_size=0.2), buffer=ReplayBuffer(capacity=64))
    monitor = GenerativeMonitor(GenerativeOptions(num_samples=24), every_n_epochs=1, batch_size=12, splits=2)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(jem, real_loader(32, 16), real_loader(48, 16))
    metrics = trainer.callback_metrics
    for source in ("buffer", "fresh"):  # the options' sources, each under its own name
        assert {f"val/gen/{source}/{k}" for k in ("fid", "is", "is_std")} <= set(metrics)
        assert math.isfinite(float(metrics[f"val/gen/{source}/fid"]))
        assert float(metrics[f"val/gen/{source}/is"]) >= 1.0 - 1e-4
        assert float(metrics[f"val/gen/{source}/fid"]) == pytest.approx(monitor.last[source]["fid"])
    assert monitor._metrics is None  # the metric (and its reference to the classifier) is dropped after use


def test_generative_monitor_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"unknown sample source\(s\) \['replay'\]"):
        GenerativeMonitor(GenerativeOptions(sources=["replay"]))
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        GenerativeMonitor(GenerativeOptions(num_samples=1))
    with pytest.raises(ValueError, match="every_n_epochs"):
        GenerativeMonitor(every_n_epochs=0)


def test_evaluate_command_measures_fid_and_is_of_the_shipped_checkpoint(tmp_path, capsys):
    from jemkit.evaluate.command import run

    out = tmp_path / "eval"
    args = ["--ckpt", str(CKPT), "--out", str(out), "--ood.sets", "[]", "--robustness.attacks", "[]"]
    args += ["--progress", "false", "--samples.per_class", "0", "--calibration.temperature_scaling", "false"]
    args += ["--generative.num_samples", "12", "--generative.fresh_steps", "5"]
    args += ["--generative.feature", "tests.test_generative.digit_features"]
    report = run(args)
    section = json.loads((out / "report.json").read_text())["generative"]
    assert section == report["generative"]
    assert section["real"] == "test" and section["num_real"] == 12 and section["feature"] == "Flatten"
    assert section["buffer"]["num_samples"] == 12 and section["fresh"]["steps"] == 5
    printed = capsys.readouterr().out
    assert "Generative quality" in printed and "buffer" in printed and "fresh" in printed
    assert "Generative quality" in format_report(report)


def digit_features() -> nn.Module:
    """A feature network given to ``--generative.feature`` as a dotted path: the raw pixels."""
    return nn.Flatten()
