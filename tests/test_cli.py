"""robustfl.cli: `robustfl list` and `robustfl run` (one cell, the pipeline's outputs, progress per round)."""
from __future__ import annotations

from pathlib import Path

import pytest

from robustfl import cli
from robustfl.config import RunConfig
from robustfl.data import datasets as data
from robustfl.fl import experiment
from tests.test_golden import canonical


def test_list_names_every_registered_item_with_its_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, reg in cli.registries().items():
        assert f"{kind}:" in out
        for name in reg.names():
            assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    assert "Blanchard et al." in out  # Krum's source


def test_list_rejects_an_unknown_kind_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list", "gizmos"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'gizmos'" in err and "defenses" in err


def test_parse_sets_reads_yaml_values() -> None:
    assert cli.parse_sets(["rounds=5", "attack_params={radius: 0.5}", "aux_class=null"]) == {
        "rounds": 5, "attack_params": {"radius": 0.5}, "aux_class": None}
    with pytest.raises(cli.CliError, match="expected key=value"):
        cli.parse_sets(["rounds"])


@pytest.mark.parametrize("argv, names", [
    (["--dataset", "mnist"], ["--dataset 'mnist'", "digits"]),
    (["--dataset", "digits", "--attack", "lie"], ["--attack 'lie'", "krum_backdoor"]),
    (["--dataset", "digits", "--defense", "rfa"], ["--defense 'rfa'", "flare"]),
    (["--dataset", "digits", "--set", "epochs=3"], ["--set epochs", "local_epochs"]),
    (["--dataset", "digits", "--set", "rounds=0"], ["rounds"]),
    (["--dataset", "digits", "--attack", "krum_backdoor", "--set", "n_attackers=5"], ["n_attackers"]),
])
def test_bad_run_arguments_get_one_line_naming_them(argv: list[str], names: list[str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("robustfl run: ")
    for n in names:
        assert n in err
    assert not (tmp_path / "results").exists()


def test_run_writes_the_pipeline_outputs_and_reports_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    sets = ["rounds=2", "local_epochs=1", "batch_size=32"]
    argv = ["run", "--dataset", "digits", "--attack", "krum_backdoor", "--defense", "krum", "--device", "cpu"]
    assert cli.main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    cfg = RunConfig.from_dict({"dataset": "digits", "attack": "krum_backdoor", "n_attackers": 1, "defense": "krum",
                               "device": "cpu", "seed": 0, "rounds": 2, "local_epochs": 1, "batch_size": 32})
    out = tmp_path / "results" / "runs" / experiment.cell_id(cfg) / "seed0"
    assert {"rounds.csv", "clients.csv", "snapshot.npz", "run.json"} <= {p.name for p in out.iterdir()}
    err = capsys.readouterr().err
    assert "round 1/2" in err and "round 2/2" in err and "attackers' weight" in err
    # the same cell through the library's run_cell gives the same rows
    d = data.prepare("digits", {}, tmp_path / "ref" / "digits")
    part = tmp_path / "ref" / "p.npz"
    experiment.build_partition(d, cfg, part)
    experiment.run_cell(cfg, d, part, tmp_path / "ref" / "run")
    for f in ("rounds.csv", "clients.csv"):
        assert canonical((out / f).read_text()) == canonical((tmp_path / "ref" / "run" / f).read_text())
    assert cli.main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0  # done: not rerun
    assert "already done" in capsys.readouterr().err
