from pathlib import Path

import pytest
import torch

from jemkit import JEM
from jemkit.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "digits.yaml"


def test_print_config_shows_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(RECIPE), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: jemkit.models.SmallCNN" in out and "class_path: jemkit.data.DigitsDataModule" in out


@pytest.mark.slow
def test_fit_then_test_then_load_without_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe writes under ./runs/digits
    main(
        [
            "fit",
            "-c",
            str(RECIPE),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--model.buffer.capacity=100",
        ]
    )
    ckpt = tmp_path / "runs/digits/checkpoints/best.ckpt"
    assert ckpt.exists() and (tmp_path / "runs/digits/checkpoints/last.ckpt").exists()
    assert list((tmp_path / "runs/digits/logs").glob("version_*/samples/class_final.png"))
    main(["test", "-c", str(RECIPE), "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar=false"])
    jem = JEM.load_from_checkpoint(ckpt)  # the CLI stored the classifier's config: no arguments needed
    assert type(jem.classifier).__name__ == "SmallCNN"
    assert jem.buffer.samples.shape == (100, 1, 8, 8)
    assert jem(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_print_config_fills_in_the_preset_and_keeps_what_was_given(capsys):
    import yaml

    base = ["fit", "--model.classifier=jemkit.models.SmallCNN", "--data=jemkit.data.DigitsDataModule"]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--model.preset=jempp", "--model.data_noise=0.0", "--print_config"])
    assert exit_info.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["preset"] == "jempp" and model["data_noise"] == 0.0  # given: kept
    assert model["sampler"]["class_path"].endswith("PYLD") and model["sampler"]["init_args"]["n_steps"] == 5
    assert model["buffer"]["init_args"]["init"]["class_path"].endswith("GaussianInit")


def test_default_root_dir_moves_every_output_of_a_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere"
    main(
        [
            "fit",
            "-c",
            str(RECIPE),
            f"--trainer.default_root_dir={out}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--model.buffer=jemkit.sampling.ReplayBuffer",
            "--model.buffer.init_args.capacity=50",
        ]
    )
    assert not (tmp_path / "runs").exists()  # nothing under the recipe's own runs/digits
    assert (out / "checkpoints/best.ckpt").exists() and (out / "checkpoints/last.ckpt").exists()
    assert list((out / "logs").glob("version_*/metrics.csv")) and list((out / "logs").glob("version_*/config.yaml"))
