"""The GPU recipes parse as shipped, carry the JEM paper's settings, and run end to end on fake CIFAR-sized data.

The JEM paper's recipes are two files each: ``cifar_base.yaml`` (the shared settings) and the dataset's file, given
in that order (``jemkit fit -c recipes/cifar_base.yaml -c recipes/cifar10.yaml``).

CI has no CIFAR files and no GPU: the smoke run swaps in ``FakeData`` and a WRN-10-1 but keeps everything else of
the recipe (channels-last, warm-up, rollback guard, OOD and calibration monitors).
"""

from pathlib import Path

import pytest
import torch
import yaml

from jemkit import JEM
from jemkit.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
BASE = "cifar_base.yaml"  # shared by the GPU_RECIPES, given before each of them
GPU_RECIPES = {
    "cifar10.yaml": ("CIFAR10DataModule", 10),
    "cifar100.yaml": ("CIFAR100DataModule", 100),
    "svhn.yaml": ("SVHNDataModule", 10),
}
FOLLOW_UP_RECIPES = {"cifar10_jempp.yaml": "jempp", "cifar10_sada.yaml": "sada"}
FINETUNE_RECIPES = {"digits_finetune.yaml", "finetune_resnet18_cifar10.yaml"}  # tests/test_finetune.py


def test_every_recipe_is_listed_here_or_tested_elsewhere():
    expected = {BASE, *GPU_RECIPES, *FOLLOW_UP_RECIPES, *FINETUNE_RECIPES, "digits.yaml", "fashion_mnist.yaml"}
    assert {p.name for p in RECIPES.glob("*.yaml")} == expected


def _config_args(name: str) -> list[str]:
    """The ``-c`` arguments that run recipe ``name``: the shared base first for the JEM paper's recipes."""
    files = [BASE, name] if name in GPU_RECIPES else [name]
    return [arg for file in files for arg in ("-c", str(RECIPES / file))]


def _printed_config(name: str, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_config_args(name), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_follow_up_recipes_carry_their_papers_settings(capsys):
    jempp = _printed_config("cifar10_jempp.yaml", capsys)["model"]
    assert jempp["preset"] == "jempp" and jempp["classifier"]["init_args"]["norm"] == "batch"
    assert jempp["sampler"]["class_path"] == "jemkit.sampling.PYLD"
    assert (jempp["sampler"]["init_args"]["n_steps"], jempp["sampler"]["init_args"]["step_size"]) == (10, 0.2)
    assert jempp["optimizer"]["class_path"] == "torch.optim.SGD" and jempp["optimizer"]["init_args"]["lr"] == 0.1
    sada = _printed_config("cifar10_sada.yaml", capsys)["model"]
    assert sada["preset"] == "sada" and sada["classifier"]["init_args"]["norm"] == "batch"
    sam = sada["optimizer"]["init_args"]
    assert sada["optimizer"]["class_path"] == "jemkit.optim.SAM" and (sam["rho"], sam["adaptive"]) == (2.0, True)
    for name in FOLLOW_UP_RECIPES:  # each header names the paper's figures and the expected cost
        header = (RECIPES / name).read_text().split("seed_everything")[0]
        assert "Paper's figures" in header and "Expected cost" in header


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipes_parse_and_follow_the_jem_paper(name, capsys):
    config = _printed_config(name, capsys)
    data_cls, num_classes = GPU_RECIPES[name]
    assert config["data"]["class_path"] == f"jemkit.data.{data_cls}"
    classifier = config["model"]["classifier"]
    assert classifier["class_path"] == "jemkit.models.WideResNet"
    expected = {"depth": 28, "widen_factor": 10, "num_classes": num_classes, "norm": None}
    assert {key: classifier["init_args"][key] for key in expected} == expected
    sampler = config["model"]["sampler"]["init_args"]
    assert (sampler["n_steps"], sampler["step_size"], sampler["noise_std"]) == (20, 1.0, 0.01)
    model = config["model"]
    buffer = model["buffer"]["init_args"]
    assert (buffer["capacity"], buffer["reinit_prob"], model["data_noise"], model["lr_warmup_steps"]) == (
        10000,
        0.05,
        0.03,
        1000,
    )
    assert classifier["init_args"]["activation"] == "leaky_relu" and classifier["init_args"]["dropout"] == 0.0
    assert model["weights"] == {"ce": 1.0, "px": 1.0, "pxy": 0.0, "energy_l2": 0.0, "margin": 0.0}  # JEM's
    assert model["optimizer"]["class_path"] == "torch.optim.Adam" and model["optimizer"]["init_args"]["lr"] == 1e-4
    assert model["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.MultiStepLR"
    scheduler = model["lr_scheduler"]["init_args"]
    assert (scheduler["milestones"], scheduler["gamma"]) == ([160, 180], 0.3)
    assert config["trainer"]["max_epochs"] == 200
    assert (config["data"]["init_args"]["batch_size"], config["data"]["init_args"]["val_size"]) == (64, 5000)
    assert config["trainer"]["default_root_dir"] == f"runs/{name.removesuffix('.yaml')}"
    header = (RECIPES / name).read_text().split("trainer:")[0]  # the header's commands give the base first
    assert f"-c recipes/{BASE} -c recipes/{name}" in header


def test_the_shared_base_is_not_a_recipe_on_its_own(capsys):
    with pytest.raises(SystemExit) as exit_info:  # no dataset: the dataset's file must follow the base
        main(["fit", "-c", str(RECIPES / BASE), "--print_config"])
    assert exit_info.value.code != 0
    assert "data" in capsys.readouterr().err


# Short chains and a small buffer; where the preset gives the sampler or buffer, the same classes are named again.
SMALL_CHAINS = {
    "cifar10.yaml": ["--model.sampler.init_args.n_steps=2", "--model.buffer.init_args.capacity=32"],
    "cifar10_jempp.yaml": [
        "--model.sampler.init_args.n_steps=2",
        "--model.buffer=jemkit.sampling.ReplayBuffer",
        "--model.buffer.init_args.capacity=32",
        "--model.buffer.init_args.init=jemkit.sampling.GaussianInit",
    ],
    "cifar10_sada.yaml": [
        "--model.sampler=jemkit.sampling.SGLD",
        "--model.sampler.init_args.n_steps=2",
        "--model.buffer=jemkit.sampling.ReplayBuffer",
        "--model.buffer.init_args.capacity=32",
        "--model.buffer.init_args.init=jemkit.sampling.GaussianInit",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10.yaml", *FOLLOW_UP_RECIPES])
def test_cifar10_recipes_run_end_to_end_on_fake_data(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # the recipe writes under ./runs/<name>
    torch._dynamo.reset()  # compile afresh, whatever other tests of this process compiled
    main(
        [
            "fit",
            *_config_args(name),
            "--data.class_path=tests.helpers.FakeCIFAR10DataModule",
            "--data.init_args.root=" + str(tmp_path),
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            "--data.init_args.val_size=8",
            "--model.classifier.init_args.depth=10",
            "--model.classifier.init_args.widen_factor=1",
            *SMALL_CHAINS[name],
            "--model.lr_warmup_steps=2",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    run = tmp_path / "runs" / name.removesuffix(".yaml")
    ckpt = run / "checkpoints/last.ckpt"
    jem = JEM.load_from_checkpoint(ckpt)
    assert not jem.chains.compiled and jem.channels_last  # compile and bf16 stay opt-in until measured on a GPU
    assert jem.buffer.samples.shape == (32, 3, 32, 32)
    assert list((run / "logs").glob("version_*/events.out.tfevents.*"))


@pytest.mark.slow
def test_the_fashion_mnist_recipe_validates_keeps_best_and_stores_its_chains_in_bytes(tmp_path, monkeypatch):
    """Tiny IDX files stand in for Debian's package; validation runs within the short run, so best.ckpt exists."""
    from tests.test_data_idx import write_set

    monkeypatch.chdir(tmp_path)  # the recipe writes under ./runs/fashion_mnist
    folder = write_set(tmp_path / "idx", gzipped=True, n_train=80, n_test=20)
    main(
        [
            "fit",
            "-c",
            str(RECIPES / "fashion_mnist.yaml"),
            f"--data.init_args.root={folder}",
            "--data.init_args.batch_size=8",
            "--data.init_args.val_size=16",
            "--model.buffer.init_args.capacity=32",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    checkpoints = tmp_path / "runs/fashion_mnist/checkpoints"
    assert {p.name for p in checkpoints.glob("*.ckpt")} == {"best.ckpt", "last.ckpt"}
    jem = JEM.load_from_checkpoint(checkpoints / "best.ckpt")
    assert jem.buffer.samples.dtype == torch.uint8 and jem.buffer.samples.shape == (32, 1, 28, 28)
