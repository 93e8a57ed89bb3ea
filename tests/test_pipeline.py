"""The Snakemake pipeline: lint, validation before any job (one clear line per mistake), a real
end-to-end run of the `tiny` study, incremental reruns and the HTML report.

Every snakemake call runs in its own temporary working directory (-d), with the repository's
Snakefile and config.yaml, so the repository's own results/ and .snakemake/ are never touched.
The real runs are marked `slow` (5-10 minutes on two CPU cores).
"""
from __future__ import annotations

import collections
import copy
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from robustfl.pipeline.study import expand_study

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def snakemake(workdir: Path, *args: str, configfiles: tuple[Path, ...] = (), timeout: int = 600
              ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(REPO / "config.yaml"), *map(str, configfiles), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def planned_jobs(text: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry-run lists."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if m:
            jobs.append((m.group(1), {}))
        elif jobs and line.strip().startswith("wildcards:"):
            body = line.strip()[len("wildcards:"):].strip()
            jobs[-1][1].update(kv.split("=", 1) for kv in body.split(", "))  # cell ids hold "," not ", "
    return jobs


# ------------------------------------------------------------------------------------ lint, dry-run
@pytest.mark.parametrize("args", [(), ("--config", "study=tiny", "pack=4")], ids=["per-run", "packed"])
def test_lint_is_clean(tmp_path, args):
    proc = snakemake(tmp_path, "--lint", *args)
    assert proc.returncode == 0, output(proc)
    assert "Lints for" not in output(proc), output(proc)


@pytest.mark.parametrize("study", ["tiny", "full"])
def test_dry_run_plans_every_output_kind(tmp_path, study):
    proc = snakemake(tmp_path, "-n", "--config", f"study={study}")
    assert proc.returncode == 0, output(proc)
    rules = {r for r, _ in planned_jobs(output(proc))}
    expected = {"prepare_data", "partition", "run_cell", "aggregate", "cells_manifest", "table2", "table3",
                "table3_trojan", "table4", "table5", "fig_confidence", "fig12", "fig13", "fig_plr", "fig_mmd",
                "fig4", "cost", "all"}
    if study != "full":  # the paper's studies have no 20-target table and no ablation
        expected |= {"table3_multiple", "aux_ablation"}
    assert expected <= rules, expected - rules


def test_quick_is_the_papers_setting_on_digits_in_one_packed_job(tmp_path):
    """`make quick`: the paper's n = 10, T = 20, E = 5 on digits, Tables 2-4 and the backdoor figures, its
    12 runs packed into one job (pack=12, as the Makefile runs it)."""
    quick = expand_study(CONFIG["studies"], "quick")
    assert {(c.cfg["dataset"], c.cfg["n_clients"], c.cfg["rounds"], c.cfg["local_epochs"]) for c in quick.values()} \
        == {("digits", 10, 20, 5)}
    proc = snakemake(tmp_path, "-n", "--config", "study=quick", "pack=12")
    assert proc.returncode == 0, output(proc)
    jobs = planned_jobs(output(proc))
    assert sum(r.startswith("run_pack_") for r, _ in jobs) == 1 and len(quick) == 12
    rules = {r for r, _ in jobs}
    assert {"table2", "table3", "table4", "fig_confidence", "fig_attack"} <= rules
    assert not rules & {"table5", "fig12", "fig13", "cost", "attack_sweep"}
    make = (REPO / "Makefile").read_text()
    assert "study=quick pack=12" in make


def test_dry_run_plans_one_attack_figure_per_tagged_backdoor_cell(tmp_path):
    """fig_attack: one job per cell tagged with it in the quick study, each fed by every seed of its cell."""
    proc = snakemake(tmp_path, "-n", "--config", "study=quick")
    assert proc.returncode == 0, output(proc)
    cells = sorted(w["cell"] for r, w in planned_jobs(output(proc)) if r == "fig_attack")
    quick = CONFIG["studies"]["quick"]
    tagged = [b for b in quick["grid"] if "fig_attack" in b.get("outputs", [])]
    assert tagged and len(cells) == len(set(cells)) == sum(len(b["defense"]) for b in tagged)
    assert all("backdoor" in c or "adaptiveplr" in c for c in cells), cells


def test_dry_run_cifar10_with_local_mirror(tmp_path):
    mirror = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
    if not mirror.exists():
        pytest.skip("no offline CIFAR-10 copy on this machine")
    cfg = yaml.safe_load((REPO / "config" / "local-mirror.yaml").read_text())
    cfg["data"]["datasets"]["cifar10"]["mirror"] = str(mirror)  # absolute: the test runs elsewhere
    extra = write_yaml(tmp_path / "mirror.yaml", cfg)
    proc = snakemake(tmp_path, "-n", "--config", "study=cifar10", configfiles=(extra,))
    assert proc.returncode == 0, output(proc)
    runs = [w for r, w in planned_jobs(output(proc)) if r == "run_cell"]
    assert runs and all("dataset=cifar10" in w["cell"] for w in runs)
    # the committed reproduction studies (every study is expanded and checked at parse time)
    repro = (REPO / "config" / "reproduction.yaml", extra)
    proc = snakemake(tmp_path, "-n", "--config", "study=repro3", "pack=9", configfiles=repro)
    assert proc.returncode == 0, output(proc)
    packs = {r: o for r, o in planned_outputs(output(proc)).items() if r.startswith("run_pack_cifar10_")}
    assert sum(len(jobs.split(", ")) for (jobs,) in packs.values()) == 34 * 3


def planned_outputs(text: str) -> dict[str, list[str]]:
    """rule name -> the outputs of each job a dry-run lists (one entry per job, comma-joined)."""
    out: dict[str, list[str]] = {}
    rule = None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("output:"):
            out.setdefault(rule, []).append(line.strip()[len("output:"):].strip())
    return out


def test_pack_mode_plans_every_run_once_in_packs_of_at_most_n(tmp_path):
    plain = snakemake(tmp_path, "-n", "--config", "study=tiny")
    packed = snakemake(tmp_path, "-n", "--config", "study=tiny", "pack=5")
    assert plain.returncode == 0 and packed.returncode == 0, output(packed)
    runs = sorted(o for o in planned_outputs(output(plain))["run_cell"])
    packs = {r: o for r, o in planned_outputs(output(packed)).items() if r.startswith("run_pack_")}
    assert "run_cell" not in planned_outputs(output(packed))
    members = [d for (jobs,) in packs.values() for d in jobs.split(", ")]
    assert sorted(members) == runs  # every run exactly once
    assert all(len(jobs.split(", ")) <= 5 for (jobs,) in packs.values())
    # one group per client count / partition (robustfl.fl.experiment.pack_group), each in ceil(size / 5) packs
    group = lambda d: tuple(sorted(t for t in d.split("/")[-2].split(",") if t.split("=")[0].startswith(("n_clients", "partition"))))
    sizes = collections.Counter(group(d) for d in runs)
    assert len(sizes) > 1  # tiny has 10- and 20-client and class-partitioned cells
    assert len(packs) == sum(-(-k // 5) for k in sizes.values())
    for (jobs,) in packs.values():
        assert len({group(d) for d in jobs.split(", ")}) == 1


@pytest.mark.parametrize("grid,token", [
    # local training differs (rounds): robustfl.fl.experiment.pack_key
    ([{"defense": ["fedavg", "flare", "median"]}, {"defense": ["krum", "fedavg"], "rounds": [3]}], "rounds=3"),
    # client counts (shard sizes) differ: lock-step training pads to the longest shard (pack_group)
    ([{"defense": ["fedavg", "flare"], "n_clients": [10, 20]}, {"defense": ["median"]}], "n_clients=20"),
])
def test_packs_never_mix_local_training_settings_or_client_counts(tmp_path, grid, token):
    study = copy.deepcopy(CONFIG["studies"]["tiny"])
    study["grid"] = grid
    extra = write_yaml(tmp_path / "mixed.yaml", {"studies": {"tiny": study}})
    proc = snakemake(tmp_path, "-n", "--config", "study=tiny", "pack=8", configfiles=(extra,))
    assert proc.returncode == 0, output(proc)
    packs = [jobs.split(", ") for r, o in planned_outputs(output(proc)).items() if r.startswith("run_pack_")
             for jobs in o]
    assert sorted(len(p) for p in packs) == [2, 3]
    for p in packs:
        assert len({token in d for d in p}) == 1, p


# ----------------------------------------------------------------------- validation before any job
def tiny_with(**study_changes) -> dict:
    study = copy.deepcopy(CONFIG["studies"]["tiny"])
    study.update(study_changes)
    return {"study": "tiny", "studies": {"tiny": study}}


BAD_CONFIGS = {
    "misspelt_defense": (tiny_with(grid=[{"defense": ["fedavg", "flair"]}]),
                         "unknown defense 'flair' at studies.tiny.grid[0].defense"),
    "misspelt_attack": (tiny_with(grid=[{"attack": ["krum_backdor"], "n_attackers": [1]}]),
                        "unknown attack 'krum_backdor' at studies.tiny.grid[0].attack"),
    "misspelt_dataset": (tiny_with(base={"dataset": "fmnst"}),
                         "unknown dataset 'fmnst' at studies.tiny.base.dataset"),
    "empty_grid_list": (tiny_with(grid=[{"defense": []}]),
                        "studies.tiny.grid[0].defense is an empty list, so this grid block has zero cells"),
    "zero_cells": (tiny_with(grid=[]), "study 'tiny' has zero cells"),
    "missing_mirror": ({"study": "tiny", "data": {"datasets": {"digits": {"mirror": "no/such/digits.tar.gz",
                                                                           "download": False}}}},
                       "data.datasets.digits.mirror: 'no/such/digits.tar.gz' does not exist"),
    "no_source": ({"study": "cifar10", "data": {"datasets": {"cifar10": {"mirror": None, "download": False}}}},
                  "data.datasets.cifar10: no mirror and download: false"),
    "unknown_top_key": ({"studdy": "tiny"}, "unknown key 'studdy' at <top level>"),
    "unknown_base_key": (tiny_with(base={"roundz": 2}), "unknown key 'roundz' at studies.tiny.base"),
    "unknown_block_key": (tiny_with(grid=[{"defence": ["flare"]}]), "unknown key 'defence' at studies.tiny.grid[0]"),
    "bad_type": (tiny_with(base={"rounds": "three"}), "bad value at studies.tiny.base.rounds"),
    "impossible_cell": (tiny_with(grid=[{"attack": ["krum_untargeted"], "n_attackers": [5]}]),
                        "config key 'n_attackers'"),
    "fig_attack_untargeted": (tiny_with(grid=[{"outputs": ["fig_attack"], "attack": ["krum_untargeted"],
                                              "n_attackers": [1]}]),
                              "`fig_attack` draws a backdoor cell's attackers, but cell"),
    "unknown_study": ({"study": "quik"}, "study 'quik' is not defined under `studies`"),
    "card_unknown_defense": ({"study": "report_card_quick", "defenses": ["flare", "rfa"]},
                             "studies.report_card_quick.card: report card: unknown defense 'rfa'"),
    "card_f_half": ({"study": "c", "studies": {"c": {"seeds": [0], "card": {"dataset": "digits", "fractions": [0.5]}}}},
                    "f = 5 >= n/2"),
    "card_empty": ({"study": "c", "studies": {"c": {"seeds": [0], "card": {"dataset": "digits", "attacks": []}}}},
                   "zero cells"),
    "unknown_include": ({"studies": {"both": {"include": ["tiny", "tinny"]}}, "study": "both"},
                        "unknown study 'tinny' included by 'both'"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_fails_with_one_clear_line(tmp_path, name):
    data, message = BAD_CONFIGS[name]
    extra = write_yaml(tmp_path / "bad.yaml", data)
    proc = snakemake(tmp_path, "-n", configfiles=(extra,))
    text = output(proc)
    assert proc.returncode != 0
    lines = [ln for ln in text.splitlines() if "config error:" in ln]
    assert len(lines) == 1, text
    assert message in lines[0], lines[0]
    assert "rule run_cell" not in text  # nothing was scheduled


def test_cuda_without_gpu_fails_before_any_job(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = snakemake(tmp_path, "-n", "--config", "study=tiny", "device=cuda")
    lines = [ln for ln in output(proc).splitlines() if "config error:" in ln]
    assert proc.returncode != 0 and len(lines) == 1, output(proc)
    assert "device: cuda requested but torch.cuda.is_available() is False" in lines[0]
    # ... and gpu_check: false lets a GPU-less submit host plan GPU jobs (SLURM)
    proc = snakemake(tmp_path, "-n", "--config", "study=tiny", "device=cuda", "gpu_check=False")
    assert proc.returncode == 0, output(proc)
    assert "gpu=1" in output(proc)


# --------------------------------------------------------------------------------- real tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny")
    proc = snakemake(work, "--cores", "2", "--config", "study=tiny", timeout=3600)
    assert proc.returncode == 0, output(proc)[-5000:]
    return work


@pytest.mark.slow
def test_tiny_end_to_end_writes_every_table_and_figure(tiny_run):
    reports = tiny_run / "reports" / "tiny"
    summary = pd.read_csv(tiny_run / "results" / "studies" / "tiny" / "summary.csv")
    tiny = CONFIG["studies"]["tiny"]
    assert len(summary) == len(pd.read_csv(reports / "cells.csv")) >= len(tiny["grid"])
    assert summary["test_acc_mean"].between(0, 1).all()
    for table in ("table2", "table3", "table3_multiple", "table3_trojan", "table4", "table5", "aux_ablation"):
        long = pd.read_csv(reports / "tables" / f"{table}_long.csv")
        ours = long[long["dataset"] == "digits"]
        assert len(ours) and ours["ours_mean"].notna().all(), table
        assert (reports / "tables" / f"{table}.md").read_text().count("(n=1)") >= 1, table
        assert (reports / "tables" / f"{table}.tex").stat().st_size > 0
    cost = pd.read_csv(reports / "tables" / "cost.csv")
    assert (cost["seconds"] > 0).all()
    figures = sorted((reports / "figures").rglob("*.png"))
    names = {p.relative_to(reports / "figures").parts[0].split(".")[0] for p in figures}
    assert {"fig_confidence_digits", "fig12_digits", "fig13_digits", "fig_plr", "fig_mmd", "fig4", "cost",
            "fig_attack"} <= names
    sweep = pd.read_csv(reports / "tables" / "attack_sweep.csv")
    attacked = sweep[sweep["attack"] == "krum_backdoor"]
    assert len(attacked) == 2 and attacked["selected_mean"].between(0, 1).all()
    assert attacked["acc_free"].notna().all()  # each beside the attack-free cell of its rule
    assert "| krum_backdoor |" in (reports / "tables" / "attack_sweep.md").read_text()
    for p in figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000, p
    # interrupted-job hygiene: no checkpoint or temp file is left behind after a clean run
    assert not list((tiny_run / "results" / "runs").rglob("*.ckpt*"))
    assert not list((tiny_run / "results").rglob("*.tmp"))


@pytest.mark.slow
def test_nothing_to_do_after_a_complete_run(tiny_run):
    proc = snakemake(tiny_run, "-n", "--config", "study=tiny")
    assert proc.returncode == 0, output(proc)
    assert planned_jobs(output(proc)) == [], output(proc)


@pytest.mark.slow
def test_changing_one_cell_reruns_only_that_cell_and_its_outputs(tiny_run):
    from robustfl.config import RunConfig
    from robustfl.fl.experiment import cell_id

    tiny = CONFIG["studies"]["tiny"]
    grid = copy.deepcopy(tiny["grid"])
    (i,) = [i for i, b in enumerate(grid) if b.get("outputs") == ["table5"]]  # a one-cell block
    grid[i]["lr"] = [0.002]
    point = {**tiny["base"], **{k: v[0] for k, v in grid[i].items() if k != "outputs"}}
    new_cell = cell_id(RunConfig.from_dict(point))
    # a config file, not --config: snakemake parses nested --config values as strings
    change = write_yaml(tiny_run / "change.yaml", {"studies": {"tiny": {"grid": grid}}})
    proc = snakemake(tiny_run, "-n", "--config", "study=tiny", configfiles=(change,))
    assert proc.returncode == 0, output(proc)
    jobs = planned_jobs(output(proc))
    assert sorted((r, w.get("cell"), w.get("seed")) for r, w in jobs if r == "run_cell") == [
        ("run_cell", new_cell, "0")]
    assert sorted(r for r, _ in jobs) == sorted(["run_cell", "aggregate", "table5", "cells_manifest", "all"])


@pytest.mark.slow
def test_pack_mode_runs_only_the_missing_runs_together(tiny_run, tmp_path):
    import json
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_run, work, symlinks=True)
    runs = sorted((work / "results" / "runs").glob("*/seed0"))
    gone, kept = runs[:2], runs[2:]
    before = {p: (p / "run.json").stat().st_mtime_ns for p in kept}
    for p in gone:
        shutil.rmtree(p)
    proc = snakemake(work, "--cores", "2", "--config", "study=tiny", "pack=4", timeout=1200)
    assert proc.returncode == 0, output(proc)[-5000:]
    jobs = [r for r, _ in planned_jobs(output(proc)) if r.startswith("run_")]
    assert len(jobs) == 1 and jobs[0].startswith("run_pack_digits_"), jobs  # both missing runs, one job
    for p in gone:
        meta = json.loads((p / "run.json").read_text())
        assert meta["packed_cells"] == 2 and meta["final"]["engine"] == "vectorised-packed(2)"
        assert len(pd.read_csv(p / "rounds.csv")) == CONFIG["studies"]["tiny"]["base"]["rounds"]
    assert {p: (p / "run.json").stat().st_mtime_ns for p in kept} == before  # the others untouched
    again = snakemake(work, "-n", "--config", "study=tiny", "pack=4")
    assert again.returncode == 0 and planned_jobs(output(again)) == [], output(again)


@pytest.mark.slow
def test_report_holds_every_table_and_figure_with_captions(tiny_run):
    html = tiny_run / "report.html"
    proc = snakemake(tiny_run, "--config", "study=tiny", "--report", str(html))
    assert proc.returncode == 0, output(proc)
    text = html.read_text(errors="replace")
    for caption in ("Mirrors <strong>Table 2</strong>", "Mirrors <strong>Table 3</strong>",
                    "Mirrors <strong>Table 4</strong>", "Mirrors <strong>Table 5</strong>",
                    "trojan</strong> counterpart of Table 3", "Table 3 with 20 targeted inputs",
                    "auxiliary class</strong>", "fraction of rounds in which the attack succeeds",
                    "Mirrors <strong>Figure 12</strong>",
                    "Mirrors <strong>Figure 13</strong>", "Figures 1a, 6, 10 and 11", "Figure 1b",
                    "Figure 4", "Section 7.4", "stands in for fMNIST"):
        assert caption in text, caption


# ---------------------------------------------------------------------------------- a real report card
@pytest.mark.slow
def test_report_card_end_to_end(tmp_path):
    card = {"dataset": "digits", "defenses": ["flare"], "attacks": ["krum_backdoor"], "fractions": [0.2],
            "partitions": ["iid", {"partition": "dirichlet", "partition_params": {"alpha": 0.3}}]}
    extra = write_yaml(tmp_path / "card.yaml", {"study": "card_mini", "studies": {"card_mini": {
        "seeds": [0], "base": {"rounds": 1, "local_epochs": 1}, "card": card}}})
    proc = snakemake(tmp_path, "--cores", "2", configfiles=(extra,), timeout=1800)
    assert proc.returncode == 0, output(proc)[-5000:]
    out = tmp_path / "reports" / "card_mini" / "report_card"
    runs = pd.read_csv(out / "card_runs.csv")
    assert len(runs) == 2 * 4  # per partition: FedAvg and FLARE, each without and under the attack
    summary = pd.read_csv(out / "card_summary.csv")
    assert set(summary["defense"]) == {"fedavg", "flare"} and summary["worst_acc"].between(0, 1).all()
    assert (summary["worst_acc_attack"] == "krum_backdoor").all()
    for d in ("fedavg", "flare"):
        assert "| Setting" in (out / f"card_{d}.md").read_text()
        assert (out / f"heatmap_{d}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "ranking.png").stat().st_size > 5000
