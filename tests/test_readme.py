"""Every README code block runs as written: Python blocks execute, `jemkit` command lines parse, YAML resolves."""

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from jemkit.cli import main
from jemkit.evaluate.command import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[list[str]]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["jemkit"]:
                    lines.append(words[1:])
    return lines


def test_the_readme_has_the_blocks_these_tests_read():
    assert len(_blocks("python")) >= 2 and len(_command_lines()) >= 4 and _blocks("yaml")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_each_python_block_runs_as_written(tmp_path, monkeypatch, index):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").symlink_to(Path(__file__).resolve().parents[1] / "checkpoints")  # as from the root
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), "resnet18_cifar10.pt")  # "your weights"
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("words", _command_lines(), ids=lambda words: " ".join(words)[:60])
def test_each_jemkit_command_line_parses(words, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the repository
    if words[0] == "evaluate":
        parser: ArgumentParser = build_parser()
        if "--help" in words:
            with pytest.raises(SystemExit) as exit_info:
                parser.parse_args(words[1:])
            assert exit_info.value.code == 0
            return
        args = ["unused.ckpt" if w.endswith(".ckpt") else w for w in words[1:]]  # any checkpoint option's file
        config = parser.parse_args(args)
        assert config.out
        return
    with pytest.raises(SystemExit) as exit_info:  # fit/validate/test: the config resolves completely
        main([*words[:1], *(w for w in words[1:] if w != "--print_config"), "--print_config"])
    assert exit_info.value.code == 0


def test_the_yaml_example_names_importable_classes():
    import importlib

    for block in _blocks("yaml"):
        config = yaml.safe_load(block)
        for section in config.values():
            for node in [section, *section.values()] if isinstance(section, dict) else []:
                if isinstance(node, dict) and "class_path" in node:
                    module, _, name = node["class_path"].rpartition(".")
                    assert hasattr(importlib.import_module(module), name), node["class_path"]


def test_ci_runs_exactly_the_readme_test_command():
    """`.ci/run` runs the README's install-lint-format-test line, word for word, and nothing else."""
    readme_line = next(line for block in _blocks("bash") for line in block.splitlines() if "python -m pytest" in line)
    assert "ruff check ." in readme_line and "ruff format --check ." in readme_line
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == [readme_line]


def test_one_version_in_pyproject_package_and_changelog_and_py_typed_shipped():
    import jemkit

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = { attr = "jemkit._version.__version__" }' in pyproject  # the version is written once
    installed = importlib.metadata.version("jemkit")
    released = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M).group(1)
    assert jemkit.__version__ == installed == released
    assert (ROOT / "jemkit" / "py.typed").is_file() and 'jemkit = ["py.typed"]' in pyproject
