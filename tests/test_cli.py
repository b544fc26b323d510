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


def test_print_config_shows_the_defaults_the_configured_classifier_gets(capsys):
    import yaml

    base = ["fit", "--model.classifier=jemkit.models.SmallCNN", "--data=jemkit.data.DigitsDataModule"]
    shown = {}
    for norm in ("null", "batch"):
        with pytest.raises(SystemExit):
            main([*base, f"--model.classifier.norm={norm}", "--print_config"])
        shown[norm] = yaml.safe_load(capsys.readouterr().out)["model"]["buffer"]["init_args"]["init"]
    assert shown["null"]["class_path"].endswith("GaussianInit")
    assert shown["null"]["init_args"]["uniform_fraction"] == 0.2
    assert shown["batch"]["class_path"].endswith("UniformInit")  # BatchNorm: restarts from the box


def test_print_config_shows_the_buffer_the_jem_resolves_without_loading_weights(capsys, monkeypatch):
    import torchvision
    import yaml
    from torchvision.models import resnet18, squeezenet1_0

    from jemkit.models import SmallCNN
    from tests.helpers import BackboneWithHead

    def no_download(*args, **kwargs):
        raise AssertionError("--print_config must not fetch weights")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", no_download)
    c = "--model.classifier"
    resnet = [f"{c}=torchvision.models.resnet18", f"{c}.weights=IMAGENET1K_V1"]
    # a weights file that does not exist here: the architecture inside jemkit.models.with_weights is what counts
    wrapped = [f"{c}=jemkit.models.with_weights", f"{c}.path=missing.ckpt"]
    wrapped += [f"{c}.classifier=jemkit.models.SmallCNN", f"{c}.classifier.norm=batch"]
    # pretrained weights nested in a backbone (no BatchNorm in SqueezeNet; BatchNorm in the head or not)
    nested = [f"{c}=tests.helpers.BackboneWithHead", f"{c}.backbone=torchvision.models.squeezenet1_0"]
    nested += [f"{c}.backbone.weights=IMAGENET1K_V1"]
    cases = {
        "resnet": (resnet, resnet18()),
        "with_weights": (wrapped, SmallCNN(norm="batch")),
        "nested": (nested, BackboneWithHead(squeezenet1_0())),
        "nested, BatchNorm head": ([*nested, f"{c}.head_norm=true"], BackboneWithHead(squeezenet1_0(), head_norm=True)),
    }
    for name, (given, classifier) in cases.items():
        with pytest.raises(SystemExit):
            main(["fit", *given, "--data=jemkit.data.DigitsDataModule", "--print_config"])
        printed = yaml.safe_load(capsys.readouterr().out)["model"]["buffer"]["init_args"]["init"]["class_path"]
        assert printed.endswith(type(JEM(classifier).buffer.init).__name__), name


def test_print_config_leaves_the_buffer_empty_when_the_classifier_cannot_be_built_here(capsys):
    import yaml

    given = ["--model.classifier=tests.helpers.ReadsFilesWhenBuilt", "--model.classifier.label_map=missing.json"]
    with pytest.raises(SystemExit):
        main(["fit", *given, "--data=jemkit.data.DigitsDataModule", "--print_config"])
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["model"]["buffer"] is None
    assert "model.buffer left null: its default depends on the classifier" in captured.err


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


def _fast_fit(root: Path, steps: int) -> list[str]:
    """Command-line options for a few steps of the digits recipe in ``root`` (a small network and buffer)."""
    return [
        f"--trainer.max_steps={steps}",
        f"--trainer.default_root_dir={root}",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--model.classifier.init_args.width=8",
        "--model.buffer={class_path: jemkit.ReplayBuffer, init_args: {capacity: 64}}",
    ]


@pytest.mark.slow
def test_a_checkpoint_of_jemkit_0_1_resumes_from_the_command_line(tmp_path):
    main(["fit", "-c", str(RECIPE), *_fast_fit(tmp_path, 2)])
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    weights = hparams.pop("weights")
    hparams.update({f"{name}_weight": value for name, value in weights.items()})  # as jemkit 0.1 recorded them
    checkpoint["jemkit"]["version"] = "0.1.0"
    legacy = tmp_path / "jemkit-0.1.ckpt"
    torch.save(checkpoint, legacy)
    assert JEM.load_from_checkpoint(legacy).weights == weights  # it loads ...
    main(["fit", "-c", str(RECIPE), "--ckpt_path", str(legacy), *_fast_fit(tmp_path, 4)])  # ... and resumes
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 4 and resumed["hyper_parameters"]["weights"] == weights


def test_a_dataset_recipe_without_its_base_names_the_base_to_give_first(capsys):
    recipes = RECIPE.parent
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(recipes / "cifar10.yaml"), "--print_config"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"jemkit fit -c {recipes / 'cifar_base.yaml'} -c {recipes / 'cifar10.yaml'}" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # with the base first it resolves
        main(["fit", "-c", str(recipes / "cifar_base.yaml"), "-c", str(recipes / "cifar10.yaml"), "--print_config"])
    assert exit_info.value.code == 0


def test_every_recipe_runs_alone_or_names_the_file_that_completes_it(capsys):
    """Each file of recipes/ resolves on its own, except a base and the files that extend it: they name each other."""
    for recipe in sorted(RECIPE.parent.glob("*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", str(recipe), "--print_config"])
        err = capsys.readouterr().err
        completes = "extends a base recipe" in err or "is a base recipe without data" in err
        assert exit_info.value.code == 0 or (completes and "jemkit fit -c" in err), (recipe.name, err[-500:])


def test_the_console_script_parses_sys_argv_without_lightnings_args_warning():
    import subprocess
    import sys

    code = "import sys; sys.argv = ['jemkit', 'fit', '--help']; from jemkit.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--trainer" in done.stdout
    assert "args parameter" not in done.stderr


def test_a_piped_run_prints_a_line_of_progress_every_n_steps(tmp_path):
    import io

    from jemkit import ReplayBuffer
    from jemkit.callbacks import ProgressLines
    from tests.helpers import TinyMLP, toy_loader, trainer

    stream = io.StringIO()
    jem = JEM(TinyMLP(), buffer=ReplayBuffer(capacity=16))
    trainer(tmp_path, max_steps=5, callbacks=[ProgressLines(every_n_steps=2, stream=stream)]).fit(jem, toy_loader())
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["step", "2/5"], ["step", "4/5"]]
    assert all("loss" in line and "s/step" in line for line in lines)
    with pytest.raises(ValueError, match="every_n_steps"):
        ProgressLines(every_n_steps=0)


def test_jemkit_fit_adds_progress_lines_when_its_output_is_not_a_terminal(tmp_path, monkeypatch):
    import io
    import sys

    from jemkit.callbacks import ProgressLines
    from jemkit.cli import JEMCLI

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    cli = JEMCLI(args=["-c", str(RECIPE), "--trainer.max_steps=1"], run=False)
    assert sum(isinstance(c, ProgressLines) for c in cli.trainer.callbacks) == 1


def test_a_report_section_is_switched_off_from_the_command_line():
    from jemkit.evaluate import RobustnessOptions
    from jemkit.evaluate.command import build_parser

    parser = build_parser()
    off = parser.instantiate_classes(parser.parse_args(["--ckpt", "x.ckpt", "--robustness", "false", "--ood", "false"]))
    assert off["robustness"] is False and off["ood"] is False
    on = parser.instantiate_classes(parser.parse_args(["--ckpt", "x.ckpt", "--robustness.defense_steps", "3"]))
    assert isinstance(on["robustness"], RobustnessOptions) and on["robustness"].defense_steps == 3
