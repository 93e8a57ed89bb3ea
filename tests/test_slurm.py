"""profiles/slurm on a real SLURM cluster: the `tiny` study submitted through snakemake-executor-plugin-slurm
to a single-node cluster on this machine (tests/slurm/cluster.sh: slurmctld, slurmd, slurmdbd on a private
MariaDB), every run job through sbatch, the tidy metrics equal to a local `--cores 2` run. Runs go in packs
(`pack=4`): rule run_cell cannot run on a remote executor (rules/run.smk says why), which is checked too.

Opt-in, because it installs (apt-get) and starts system daemons as root: `make test-slurm`, or
ROBUSTFL_SLURM_TEST=1. Skips, saying why, where that is not possible (not root, no apt-get, install fails).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
ACCOUNT, PARTITION = "robustfl", "cpu"  # what cluster.sh defines

pytestmark = pytest.mark.slow


def sh(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    if os.environ.get("ROBUSTFL_SLURM_TEST") != "1":
        pytest.skip("installs and starts SLURM as root: run `make test-slurm` (or set ROBUSTFL_SLURM_TEST=1)")
    if os.geteuid() != 0:
        pytest.skip("needs root to install SLURM and start its daemons")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and not conf.is_symlink():
        pytest.skip(f"{conf} exists: this machine has a SLURM configuration of its own, which the test cluster leaves alone")
    try:
        install = sh(CLUSTER, "install", timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("installing SLURM with apt-get took over 15 minutes")
    if install.returncode != 0:
        pytest.skip(f"SLURM could not be installed: {(install.stdout + install.stderr).strip()[-500:]}")
    up = sh(CLUSTER, "up", timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:
        down = sh(CLUSTER, "down", timeout=600)
        assert down.returncode == 0, down.stdout + down.stderr


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", workdir,
           "--configfile", REPO / "config.yaml", *args]
    return sh(*cmd, timeout=3600)


def tidy(work: Path, name: str) -> pd.DataFrame:
    """A tidy metrics frame of the tiny study without what may differ between machines (times, device)."""
    frame = pd.read_csv(work / "results" / "studies" / "tiny" / name)
    drop = [c for c in frame.columns if re.search(r"_s($|_)", c) or c in ("device", "devices")]
    return frame.drop(columns=drop)


def test_tiny_study_through_the_slurm_profile_equals_a_local_run(cluster, tmp_path):
    slurm_work, local_work = tmp_path / "slurm", tmp_path / "local"
    profile = ("--profile", REPO / "profiles" / "slurm", "--default-resources", f"slurm_account={ACCOUNT}",
               f"slurm_partition={PARTITION}", "--slurm-init-seconds-before-status-checks", "5")
    # pack: 1 (rule run_cell, cell ids as wildcards) cannot run remotely: one clear error before any job
    proc = snakemake(slurm_work, *profile, "--config", "study=tiny", "device=cpu")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config error: pack: 1 cannot run on a remote executor" in log, log[-3000:]
    assert "submitted with SLURM jobid" not in log

    proc = snakemake(slurm_work, *profile, "--config", "study=tiny", "device=cpu", "pack=4")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "could not check status" not in log

    # every run job went through sbatch, and SLURM's accounting saw each of them complete
    runs = sorted((slurm_work / "results" / "runs").glob("*/seed*"))
    assert len(runs) >= 20  # the tiny study's cells x seeds
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", log)
    packs = {rule: jid for jid, rule in submitted if rule.startswith("run_")}
    assert len(packs) == len([r for _, r in submitted if r.startswith("run_")]) >= 2, submitted
    acct = sh("sacct", "-X", "--parsable2", "--noheader", "--format=JobIDRaw,State,Account,Partition",
              "-j", ",".join(packs.values()))
    assert acct.returncode == 0, acct.stderr
    rows = [line.split("|") for line in acct.stdout.split()]
    assert sorted(r[0] for r in rows) == sorted(packs.values()), acct.stdout
    assert all(r[1:] == ["COMPLETED", ACCOUNT, PARTITION] for r in rows), acct.stdout

    # the same study run locally, in another working directory, runs the same packs to the same metrics
    proc = snakemake(local_work, "--cores", "2", "--config", "study=tiny", "device=cpu", "pack=4")
    local_log = proc.stdout + proc.stderr
    assert proc.returncode == 0, local_log[-5000:]
    assert set(re.findall(r"^(?:local)?rule (run_\w+):", local_log, re.M)) == set(packs)
    for name in ("all_rounds.csv", "all_clients.csv", "summary.csv"):
        pd.testing.assert_frame_equal(tidy(slurm_work, name), tidy(local_work, name), check_exact=True,
                                      obj=name)
    local_reports = sorted(p.relative_to(local_work / "reports") for p in (local_work / "reports").rglob("*.*"))
    assert local_reports == sorted(p.relative_to(slurm_work / "reports")
                                   for p in (slurm_work / "reports").rglob("*.*"))
