"""The quality benchmark runs end to end at a tiny size and writes tables whose numbers are what it measured."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ holds scripts
import quality


def _check(summary: dict, scenario: str, configs: list[str]) -> None:
    for config in configs:
        entry = summary[scenario][config]
        assert entry["failed"] == [] and entry["seeds"] == 1
        assert 0.0 <= entry["acc"][0] <= 1.0 and entry["ece"][1] == 0.0  # one seed: no spread
        sets = (
            {"noise", "shuffled", "mixtures", "heldout"} if scenario == "openset" else {"noise", "shuffled", "mixtures"}
        )
        assert set(entry["auroc"]) == sets
        assert all(0.0 <= pair[0] <= 1.0 for scores in entry["auroc"].values() for pair in scores.values())


def test_training_from_scratch_writes_json_and_markdown(tmp_path):
    out = tmp_path / "px0.03"  # a dot in the name must survive
    argv = ["--configs", "plain", "default", "--scenarios", "openset", "--seeds", "0", "--steps", "3"]
    result = quality.main([*argv, "--width", "8", "--workers", "1", "--out", str(out)])
    _check(result["summary"], "openset", ["plain", "default"])
    saved = json.loads(Path(f"{out}.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    table = Path(f"{out}.md").read_text()
    assert "| plain |" in table and "| default |" in table and "logpx vs heldout" in table


@pytest.mark.slow
def test_the_finetuning_scenario_reports_the_pretrained_classifier_beside_each_candidate(tmp_path):
    argv = ["--finetune", "--configs", "finetune", "--scenarios", "digits", "--seeds", "0", "--steps", "10"]
    result = quality.main([*argv, "--width", "8", "--workers", "1", "--cache", str(tmp_path / "cache")])
    _check(result["summary"], "digits", ["pretrained", "finetune"])
    assert result["summary"]["digits"]["pretrained"]["ms_per_step"][0] == 0.0  # measured as it is, not trained
    assert len(list((tmp_path / "cache").glob("digits-seed0-*.pt"))) == 1  # pre-trained once, cached
    assert [r["config"] for r in result["runs"]] == ["pretrained", "finetune"]


def test_unknown_configs_are_named():
    with pytest.raises(SystemExit):
        quality.main(["--configs", "no-such-config"])
