"""The quality benchmark runs end to end at a tiny size and writes tables whose numbers are what it measured."""

import json
import sys
from pathlib import Path

import pytest
import torch

from jemkit.sampling import SOURCES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ holds scripts
import quality


def _check(summary: dict, scenario: str, configs: list[str]) -> None:
    for config in configs:
        entry = summary[scenario][config]
        assert entry["failed"] == [] and entry["seeds"] == 1
        assert 0.0 <= entry["acc"][0] <= 1.0 and entry["ece"][1] == 0.0  # one seed: no spread
        sets = {"noise", "shuffled", "mixtures", "vflip", "invert"} | ({"heldout"} if scenario == "openset" else set())
        assert set(entry["auroc"]) == sets
        assert all(0.0 <= pair[0] <= 1.0 for scores in entry["auroc"].values() for pair in scores.values())
        # every run carries the post-hoc toolbox on its own features, the fused score rules and its temperature-scaled
        # calibration
        expected = {*quality.ALL_SCORES, "complexity", *quality.FUSIONS}
        assert all(set(scores) == expected for scores in entry["auroc"].values())
        assert entry["temperature"][0] > 0.0 and 0.0 <= entry["ece_ts"][0] <= 1.0


def test_training_from_scratch_writes_json_and_markdown(tmp_path, monkeypatch):
    out = tmp_path / "px0.03"  # a dot in the name must survive
    argv = ["--configs", "plain", "default", "--scenarios", "openset", "--seeds", "0", "--steps", "3"]
    dump = tmp_path / "dump"
    result = quality.main([*argv, "--width", "8", "--workers", "1", "--out", str(out), "--dump", str(dump)])
    _check(result["summary"], "openset", ["plain", "default"])
    saved = json.loads(Path(f"{out}.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    table = Path(f"{out}.md").read_text()
    assert "| plain |" in table and "| default |" in table and "logpx vs heldout" in table
    assert "| plain + mahalanobis |" in table and "| default + vim |" in table
    checks = result["verdicts"][0]["checks"]
    assert set(checks) == set(quality.TARGETS)
    # the toolbox verdict is the documented comparison, recomputed from the summary
    plain, jem = result["summary"]["openset"]["plain"], result["summary"]["openset"]["default"]
    best_plain = {s: max(pair[0] for pair in plain["auroc"][s].values()) for s in ("noise", "shuffled", "heldout")}
    expected = all(jem["auroc"][s]["logpx"][0] >= best_plain[s] - 0.005 for s in best_plain)
    assert checks["toolbox"] == expected
    row = next(line for line in table.splitlines() if line.startswith("| openset | default | heldout |"))
    assert f"{best_plain['heldout']:.3f}" in row
    # the score-rule table: every candidate's AUROC beside the same best plain score, 'miss' where it is below - 0.005
    rules, density = table.split("Score rules")[1].split("Density and samples")
    rule_rows = [line for line in rules.splitlines() if line.startswith("| openset | default | heldout | ")]
    rule_row = rule_rows[-1].split(" | ")
    assert rule_row[3].startswith(f"{best_plain['heldout']:.3f}")
    for rule, cell in zip(quality.RULE_CANDIDATES, rule_row[4:], strict=True):
        auroc = jem["auroc"]["heldout"][rule][0]
        assert cell.strip(" |") == f"{auroc:.3f}" + ("" if auroc >= best_plain["heldout"] - 0.005 else " miss")
    # issue 33's table: the JEM's density beside the plain classifier's energy, 'miss' below it - 0.005
    density_row = next(line for line in density.splitlines() if line.startswith("| openset | default | heldout | "))
    energy, logpx = plain["auroc"]["heldout"]["logpx"][0], jem["auroc"]["heldout"]["logpx"][0]
    cells = density_row.split(" | ")
    assert cells[3] == f"{energy:.3f}" and cells[4] == f"{logpx:.3f}" + ("" if logpx >= energy - 0.005 else " miss")
    # rebuilt from the saved runs alone, the tables are the same
    merged = quality.main(["--from_json", f"{out}.json", "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged.md").read_text() == table
    assert merged["summary"] == result["summary"]
    grids = [f"{source}_openset-{config}-seed0.png" for config in ("default", "plain") for source in SOURCES]
    expected = sorted([*grids, "openset-default-seed0.pt", "openset-plain-seed0.pt"])
    assert sorted(p.name for p in dump.iterdir()) == expected  # per-sample scores, and sample grids of each source
    # rescored from the dumped per-sample scores: the same AUROCs, and a rule added later is measured too
    monkeypatch.setitem(quality.FUSIONS, "logpx+msp", ("sum", ("logpx", "msp")))
    rescored = quality.main(["--from_json", f"{out}.json", "--rescore", str(dump)])
    for run, again in zip(result["runs"], rescored["runs"], strict=True):
        assert {s: {k: v for k, v in a.items() if k != "logpx+msp"} for s, a in again["auroc"].items()} == run["auroc"]
        assert all(0.0 <= a["logpx+msp"] <= 1.0 for a in again["auroc"].values())
    assert " | logpx+msp |" in quality.rule_table(rescored["summary"])


def test_fused_scores_standardise_with_the_reference_statistics():
    reference = {"logpx": torch.tensor([1.0, 3.0]), "knn": torch.tensor([-2.0, -2.0]), "mahalanobis": torch.ones(2)}
    stats = quality.standardisation(reference)
    assert stats["logpx"] == pytest.approx((2.0, 2.0**0.5)) and stats["knn"] == (-2.0, 1.0)  # constant: sd 1
    scores = {"logpx": torch.tensor([2.0, 0.0]), "knn": torch.tensor([-1.0, -4.0]), "mahalanobis": torch.zeros(2)}
    fusions = {"sum": ("sum", ("logpx", "knn")), "min": ("min", ("logpx", "knn")), "none": ("sum", ("logpx", "vim"))}
    fused = quality.fused_scores(scores, stats, fusions)
    z_logpx, z_knn = torch.tensor([0.0, -2.0 / 2.0**0.5]), torch.tensor([1.0, -2.0])
    assert set(fused) == {"sum", "min"}  # a fusion with a missing part (ViM without a head) is left out
    torch.testing.assert_close(fused["sum"], z_logpx + z_knn)
    torch.testing.assert_close(fused["min"], torch.minimum(z_logpx, z_knn))


def test_held_out_classes_of_data_without_a_classes_option():
    """``wine-open`` / ``signals-open``: the kept classes relabelled 0..k-1, the others' test rows held out."""
    make_data, make_model = quality.SCENARIOS["wine-open"]
    dm = make_data()
    assert dm.num_classes == 2 and make_model(dm, False, 8).head.out_features == 2
    for split in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert set(split.tensors[1].tolist()) == {0, 1}
    assert set(dm.heldout_dataset.tensors[1].tolist()) == {2}
    full = quality.TabularDataModule(dataset="wine", batch_size=64)
    full.setup("fit")
    held_rows = (full.test_dataset.tensors[1] == 2).sum().item()
    assert len(dm.heldout_dataset) == held_rows and len(dm.test_dataset) + held_rows == len(full.test_dataset)


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
