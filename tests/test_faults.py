"""Faults and bad input (issue 21): each case through the public API or the CLI, with the message a user sees."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from jemkit import JEM, PYLD, SGLD, DivergenceError, DivergenceGuard, ReplayBuffer
from jemkit.checkpoint import AtomicCheckpointIO
from jemkit.cli import main
from tests.helpers import TinyMLP, loader, toy_loader, trainer


def _labels_with(bad: int, n: int = 48, batch_size: int = 16):
    x, y = torch.randn(n, 2), torch.arange(n) % 3
    y[batch_size * 2 + 3] = bad  # in the third batch: the first batch's full check does not see it
    return loader(x, y, batch_size)


@pytest.mark.parametrize(("bad", "hint"), [(12, r"\[12\] outside \[0, 3\)"), (-100, "ignore_index")])
def test_a_bad_label_in_a_later_batch_is_named_with_its_batch(tmp_path, bad, hint):
    jem = JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=16))
    with pytest.raises(ValueError, match=rf"training batch 2 has labels .*{hint}"):
        trainer(tmp_path, max_epochs=1).fit(jem, _labels_with(bad))


def test_a_sampler_with_zero_steps_is_refused_but_zero_steps_in_one_call_means_no_refinement():
    for sampler in (SGLD, PYLD):
        with pytest.raises(ValueError, match=r"n_steps must be an integer >= 1, got 0 .*pass n_steps=0 to sample"):
            sampler(n_steps=0)
    x0 = torch.rand(5, 2) * 2 - 1
    torch.testing.assert_close(PYLD().sample(lambda x: (x**2).sum(1), x0, n_steps=0), x0)


def test_a_conditional_buffer_says_how_many_slots_it_keeps():
    with pytest.warns(UserWarning, match=r"capacity 25 is not a multiple of num_classes 10.* keeps 20: pass capacity="):
        buffer = ReplayBuffer(capacity=25, conditional=True, num_classes=10, input_shape=(2,))
    assert buffer.capacity == 20


def test_a_checkpoint_with_a_nan_weight_is_refused_by_name(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt]).fit(
        JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=10)), toy_loader()
    )
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    name = next(k for k in state["state_dict"] if k.startswith("classifier.") and k.endswith("weight"))
    state["state_dict"][name][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=rf"non-finite \(NaN/inf\) weights in \['{name}'\]"):
        JEM.load_from_checkpoint(tmp_path / "nan.ckpt", classifier=TinyMLP())


class LearningRateSpike(Callback):
    """One optimiser step at a huge learning rate, just before the guard's snapshot."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 1e6 if trainer.global_step == self.at_step else 0.05


def test_a_rollback_never_restores_weights_that_no_step_has_judged(tmp_path):
    torch.manual_seed(0)
    guard = DivergenceGuard(action="rollback", snapshot_every_n_steps=5, max_rollbacks=3)
    jem = JEM(
        TinyMLP(),
        sampler=SGLD(n_steps=1),
        buffer=ReplayBuffer(capacity=16),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*DivergenceGuard.*")
        trainer(tmp_path, max_steps=12, callbacks=[guard, LearningRateSpike(at_step=4)]).fit(jem, toy_loader())
    assert 1 <= guard.rollbacks < 3  # the spike is rolled back once and training goes on
    assert guard.events[0]["restored_step"] < 5  # the snapshot before the spike, not the blown-up one
    assert all(bool(torch.isfinite(p).all()) for p in jem.parameters())


def test_no_checkpoint_is_written_from_weights_that_give_non_finite_outputs(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    jem = JEM(
        TinyMLP(),
        sampler=SGLD(n_steps=1),
        buffer=ReplayBuffer(capacity=16),
        optimizer=lambda params: torch.optim.SGD(params, lr=1e38),
    )
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)]
    with pytest.raises(DivergenceError):
        trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=callbacks).fit(jem, toy_loader())
    for path in ckpt_dir.glob("*.ckpt"):  # what was written loads and computes finite logits
        loaded = JEM.load_from_checkpoint(path, classifier=TinyMLP())
        assert bool(torch.isfinite(loaded(torch.randn(4, 2))).all())


def test_an_unwritable_checkpoint_folder_is_named_before_the_first_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    callbacks = [ModelCheckpoint(dirpath=blocker / "ckpts", save_last=True)]
    jem = JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=16))
    with pytest.raises(OSError, match=r"cannot write checkpoints to .*a_file/ckpts"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=callbacks).fit(jem, toy_loader())
    assert jem.global_step == 0


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*last.ckpt: no space left on the device"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target)["step"] == 1
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_temporary_files_of_dead_saves_are_cleaned_on_the_next_start(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    dead, alive = ckpt_dir / ".last.ckpt.tmp-999999999", ckpt_dir / f".best.ckpt.tmp-{os.getpid()}"
    dead.write_bytes(b"half"), alive.write_bytes(b"in progress")
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    jem = JEM(TinyMLP(), sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=16))
    trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=callbacks).fit(jem, toy_loader())
    assert not dead.exists() and alive.exists()


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    args = ["fit", "-c", "recipes/digits.yaml", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root)]
    args += ["--model.classifier.init_args.width", "8", "--trainer.limit_val_batches", "1"]
    args += ["--trainer.enable_progress_bar", "false"]
    main([*args, "--model.buffer", "{class_path: jemkit.ReplayBuffer, init_args: {capacity: 64}}"])
    return next(root.rglob("last.ckpt"))


def test_resuming_with_changed_model_options_names_each_ignored_option(digits_checkpoint, capsys):
    argv = ["fit", "-c", "recipes/digits.yaml", "--ckpt_path", str(digits_checkpoint), "--trainer.max_steps", "3"]
    argv += ["--model.classifier.init_args.width", "16", "--model.data_noise", "0.1"]
    with pytest.raises(SystemExit):
        main(argv)
    message = capsys.readouterr().err
    assert "would be ignored: model.classifier.init_args.width=16 (the checkpoint has 8)" in message
    assert "model.data_noise=0.1 (the checkpoint has 0.03)" in message
    assert "Traceback" not in message
    root = digits_checkpoint.parents[1]
    same = ["fit", "-c", "recipes/digits.yaml", "--ckpt_path", str(digits_checkpoint), "--trainer.max_steps", "3"]
    same += ["--model.classifier.init_args.width", "8", "--trainer.default_root_dir", str(root)]
    same += ["--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    main([*same, "--model.buffer", "{class_path: jemkit.ReplayBuffer, init_args: {capacity: 64}}"])  # resumes
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_cli_mistake_is_one_line_and_debug_shows_the_traceback(capsys):
    argv = ["fit", "-c", "recipes/digits.yaml", "--model.weights", "{pz: 1.0}", "--trainer.max_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("jemkit: error: unknown objective weight(s) ['pz']") and "Traceback" not in err
    with pytest.raises(ValueError, match="unknown objective weight"):
        main([*argv, "--debug"])


def test_a_binary_head_is_not_mistaken_for_bad_labels(tmp_path):
    head = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(64, 2)
    y = (x[:, :1] > 0).float()  # [B, 1] float labels, as BCE users have them
    jem = JEM(head, sampler=SGLD(n_steps=1), buffer=ReplayBuffer(capacity=16))
    trainer(tmp_path, max_steps=4).fit(jem, loader(x, y, 16))
    assert jem.num_classes == 2 and jem(x).shape == (64, 2)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--ood.sets", "[uniform,imagenet]"], r"unknown OOD set\(s\) \['imagenet'\]"),
        (["--ood.scores", "[logpx,foo]"], "foo"),
        (["--robustness.attacks", '[{"kind": "pgd", "eps_01": -1}]'], "eps_01 must be a finite number >= 0"),
    ],
)
def test_evaluate_refuses_bad_options_before_writing_anything(tmp_path, capsys, option, message):
    out = tmp_path / "eval"
    with pytest.raises(SystemExit):
        main(["evaluate", "--ckpt", "checkpoints/jem-digits.ckpt", "--out", str(out), *option])
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_evaluate_names_both_shapes_when_the_data_does_not_fit_the_checkpoint(tmp_path, capsys):
    argv = ["evaluate", "--ckpt", "checkpoints/jem-digits.ckpt", "--out", str(tmp_path / "eval")]
    argv += ["--data", "jemkit.data.GaussianMixtureDataModule", "--robustness.attacks", "[]", "--progress", "false"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "inputs of shape (2,) but the checkpoint's model takes (1, 8, 8)" in capsys.readouterr().err
