"""Resumable, deterministic runs (README "Guarantees"): a run killed at any moment (SIGKILL, SIGTERM, an
exception mid-round, a crash while a checkpoint is being written) and started again ends with exactly the
metrics of an uninterrupted run on CPU; a corrupt, foreign or mismatched checkpoint is never resumed from
(fallback to the previous one, else a fresh start with a logged warning); same config + seed give identical
metrics files; run.json records the provenance.

"Identical" is checked exactly: every column of rounds.csv except the wall-clock timings train_s, attack_s
and agg_s (which differ by nature) as the written strings, clients.csv byte for byte, and every array of
snapshot.npz (PLRs and head weights of every client model of the last round: the global model's bits).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustfl.data import datasets as data
from robustfl.fl import experiment
from robustfl.fl import simulate
from robustfl import io as rio
from robustfl.config import RunConfig

TIMING = ["train_s", "attack_s", "agg_s"]
ROUNDS = 3
# every random stream of a run is used: the batch plans and FLTrust's root-set training (the cell's
# generator), the attack's noise (its own generator: krum_untargeted with 2 attackers), torch's global RNG
BASE = dict(dataset="digits", rounds=ROUNDS, local_epochs=1, batch_size=32, checkpoint_every=1,
            engine={"kind": "sequential"}, device="cpu", attack="krum_untargeted", n_attackers=2, defense="fltrust")


def make_cfg(**kw) -> RunConfig:
    return RunConfig(**{**BASE, **kw})


def ckpt_of(out: Path) -> Path:
    return out.parent / f".{out.name}.ckpt.pt"  # experiment.run_cell's default location


def prev_of(out: Path) -> Path:
    return ckpt_of(out).with_suffix(".prev.pt")


def checkpoint_files(out: Path) -> list[str]:
    """The run's checkpoints and any temporary file of a checkpoint write (``..<name>.ckpt.pt.XXXX.tmp``)."""
    return sorted(p.name for p in out.parent.iterdir() if f".{out.name}.ckpt" in p.name)


class Interrupted(Exception):
    pass


def run_interrupted(cfg, data_dir: Path, part: Path, out: Path, after: int = 2) -> None:
    """Run the cell and stop it (raising :class:`Interrupted`) right after the checkpoint of round ``after``."""
    orig = simulate.Simulation._checkpoint

    def hook(self):
        orig(self)
        if self.round == after:
            raise Interrupted

    simulate.Simulation._checkpoint = hook
    try:
        with pytest.raises(Interrupted):
            experiment.run_cell(cfg, data_dir, part, out)
    finally:
        simulate.Simulation._checkpoint = orig


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Digits data, one partition, the reference uninterrupted run, and the checkpoints (after rounds 1 and
    2) of a run interrupted right after its round-2 checkpoint. One torch thread, as the helper process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume")
    d = data.prepare("digits", {}, tmp_path_factory.getbasetemp() / "digits")  # shared by the test modules
    part = root / "part.npz"
    experiment.build_partition(d, make_cfg(), part)
    ref = root / "runs" / "reference"
    experiment.run_cell(make_cfg(), d, part, ref)

    stash = root / "runs" / "stash"
    run_interrupted(make_cfg(), d, part, stash)
    assert not (stash / "rounds.csv").exists()
    assert rio.load_checkpoint(ckpt_of(stash))["round"] == 2 and rio.load_checkpoint(prev_of(stash))["round"] == 1
    yield {"data": d, "part": part, "ref": ref, "root": root, "stash": stash}
    torch.set_num_threads(threads)


def assert_same_metrics(a: Path, b: Path) -> None:
    ra = pd.read_csv(a / "rounds.csv", dtype=str, keep_default_na=False)
    rb = pd.read_csv(b / "rounds.csv", dtype=str, keep_default_na=False)
    assert len(ra) == ROUNDS and list(ra.columns) == simulate.ROUND_COLUMNS
    pd.testing.assert_frame_equal(ra.drop(columns=TIMING), rb.drop(columns=TIMING))
    assert (a / "clients.csv").read_bytes() == (b / "clients.csv").read_bytes()
    with np.load(a / "snapshot.npz") as za, np.load(b / "snapshot.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            assert np.array_equal(za[k], zb[k]), k


def from_stash(env, name: str) -> Path:
    """A fresh output directory whose checkpoints are copies of the interrupted run's (rounds 2 and 1)."""
    out = env["root"] / "runs" / name
    shutil.copy(ckpt_of(env["stash"]), ckpt_of(out))
    shutil.copy(prev_of(env["stash"]), prev_of(out))
    return out


def resume(env, out: Path, caplog, **kw) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="robustfl"):
        experiment.run_cell(make_cfg(**kw), env["data"], env["part"], out)
    assert checkpoint_files(out) == []  # removed once the outputs exist
    return caplog.text


def test_reference_run_leaves_no_checkpoint(env):
    assert (env["ref"] / "run.json").exists()
    assert checkpoint_files(env["ref"]) == []


# -------------------------------------------------------------------------------- killed processes
HELPER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from robustfl.fl import experiment
    from robustfl.fl import simulate
    from robustfl.config import RunConfig

    cfg, data_dir, part, out = json.loads(sys.argv[1]), *sys.argv[2:5]
    orig = simulate.Simulation._checkpoint
    def hook(self):
        orig(self)
        if self.round == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    simulate.Simulation._checkpoint = hook
    experiment.run_cell(RunConfig.from_dict(cfg), Path(data_dir), Path(part), Path(out))
    sys.exit(3)  # not reached: the process was killed
""")


def test_sigkilled_process_resumes_to_identical_metrics(env, caplog):
    """A fresh interpreter runs the cell and SIGKILLs itself right after writing the round-2 checkpoint."""
    out = env["root"] / "runs" / "sigkill"
    helper = env["root"] / "helper.py"
    helper.write_text(HELPER)
    proc = subprocess.run([sys.executable, str(helper), json.dumps(make_cfg().to_dict()), str(env["data"]),
                           str(env["part"]), str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "rounds.csv").exists() and not (out / "run.json").exists()
    assert rio.load_checkpoint(ckpt_of(out))["round"] == 2 and rio.load_checkpoint(prev_of(out))["round"] == 1
    text = resume(env, out, caplog)
    assert "after round 2" in text, text
    assert_same_metrics(env["ref"], out)


def _kill_in_fork(env, out: Path, arm) -> int:
    """Run the cell in a forked child (no second torch import) in which ``arm(sig_self)`` installed a hook
    that kills it; return the child's exit code (-signal when killed)."""
    def child():
        arm(lambda sig: os.kill(os.getpid(), sig))
        experiment.run_cell(make_cfg(), env["data"], env["part"], out)
        os._exit(3)  # not reached

    p = multiprocessing.get_context("fork").Process(target=child)
    p.start()
    p.join(300)
    return p.exitcode


def _arm_sigterm_while_writing_checkpoint_2(kill):
    """SIGTERM in the middle of writing the round-2 checkpoint: the latest (round 1) is already rotated to
    .prev and half a temp file is on disk."""
    orig = torch.save

    def hook(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("round") == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            kill(signal.SIGTERM)
        return orig(obj, f, *a, **k)

    torch.save = hook


def _arm_sigkill_mid_training_round_2(kill):
    """SIGKILL while the benign clients of round 2 are training."""
    from robustfl import engine

    orig = engine.train_clients
    calls = []

    def hook(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # round 1: benign + FLTrust's root-set update; round 2: benign
            kill(signal.SIGKILL)
        return orig(*a, **k)

    engine.train_clients = hook


@pytest.mark.parametrize("arm, sig, latest, prev, resumed_after", [
    (_arm_sigterm_while_writing_checkpoint_2, signal.SIGTERM, None, 1, 1),
    (_arm_sigkill_mid_training_round_2, signal.SIGKILL, 1, None, 1),
], ids=["sigterm-while-writing-checkpoint", "sigkill-mid-training"])
def test_killed_mid_round_resumes_to_identical_metrics(env, caplog, arm, sig, latest, prev, resumed_after):
    out = env["root"] / "runs" / arm.__name__
    assert _kill_in_fork(env, out, arm) == -sig
    assert not (out / "rounds.csv").exists() and not (out / "run.json").exists()
    if latest is None:
        assert not ckpt_of(out).exists()
        assert any(f.endswith(".tmp") for f in checkpoint_files(out))  # the killed write's temp file
    else:
        assert rio.load_checkpoint(ckpt_of(out))["round"] == latest
    if prev is None:
        assert not prev_of(out).exists()
    else:
        assert rio.load_checkpoint(prev_of(out))["round"] == prev
    text = resume(env, out, caplog)
    assert f"after round {resumed_after}" in text, text
    assert_same_metrics(env["ref"], out)


def test_exception_mid_round_with_checkpoint_every_2(env, monkeypatch, caplog):
    """Interrupted inside round 3's aggregation; the only checkpoint is round 2's (checkpoint_every=2)."""
    out = env["root"] / "runs" / "every2"
    fltrust = simulate.DEFENSES._items["fltrust"]

    def failing(updates, ctx):
        raise Interrupted

    with monkeypatch.context() as m:
        orig = simulate.Simulation.step

        def hook(self, ben, train_s):
            if self.round == 2:
                m.setitem(simulate.DEFENSES._items, "fltrust", failing)
                self.defense_fn = failing
            return orig(self, ben, train_s)

        m.setattr(simulate.Simulation, "step", hook)
        with pytest.raises(Interrupted):
            experiment.run_cell(make_cfg(checkpoint_every=2), env["data"], env["part"], out)
    assert simulate.DEFENSES._items["fltrust"] is fltrust
    assert rio.load_checkpoint(ckpt_of(out))["round"] == 2 and not prev_of(out).exists()
    assert "after round 2" in resume(env, out, caplog, checkpoint_every=2)
    assert_same_metrics(env["ref"], out)  # checkpoint_every is not part of the result


# ------------------------------------------------------------------------------------ bad checkpoints
def test_truncated_latest_checkpoint_falls_back_to_previous(env, caplog):
    out = from_stash(env, "truncated")
    ck = ckpt_of(out)
    ck.write_bytes(ck.read_bytes()[:1000])
    text = resume(env, out, caplog)
    assert "corrupt" in text and str(ck) in text
    assert "after round 1" in text
    assert_same_metrics(env["ref"], out)


def test_silently_changed_latest_checkpoint_is_detected(env, caplog):
    """A checkpoint whose content changed but that still loads (torch.load checks no CRC) is caught by its
    checksum and the previous one is used."""
    out = from_stash(env, "tampered")
    st = torch.load(ckpt_of(out), weights_only=True)
    st["theta"][0] += 0.5
    torch.save(st, ckpt_of(out))
    text = resume(env, out, caplog)
    assert "does not match its checksum" in text and "after round 1" in text
    assert_same_metrics(env["ref"], out)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_both_checkpoints_corrupt_start_over_with_a_warning(env, caplog, tmp_path):
    """Latest truncated, previous a pickle that would run code: neither is used, nothing is executed."""
    out = from_stash(env, "both_corrupt")
    ckpt_of(out).write_bytes(ckpt_of(out).read_bytes()[:-200])
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"round": 1, "theta": Evil()}, prev_of(out))
    text = resume(env, out, caplog)
    assert "corrupt or unreadable" in text and str(prev_of(out)) in text
    assert "no usable checkpoint; starting from round 1" in text and "resumed" not in text
    assert not marker.exists()
    assert_same_metrics(env["ref"], out)


def test_foreign_or_mismatched_checkpoints_are_ignored(env, caplog):
    """Latest from another configuration; previous with the right config and checksum but a global model of
    another size (the model code changed): both ignored, the run starts over and is still exact."""
    out = from_stash(env, "foreign")
    st = rio.load_checkpoint(ckpt_of(out))
    st["config_hash"] = "0" * 16
    rio.save_checkpoint(ckpt_of(out), st)
    st = rio.load_checkpoint(prev_of(out))
    st["theta"] = st["theta"][:-1]
    rio.save_checkpoint(prev_of(out), st)
    text = resume(env, out, caplog)
    assert "belongs to another configuration; ignored" in text
    assert "does not match this run" in text and "no usable checkpoint" in text and "resumed" not in text
    assert_same_metrics(env["ref"], out)


def test_comparison_detects_an_unrestored_rng(env, caplog):
    """The metric comparison can fail: resuming with the RNG state of another seed changes the files."""
    out = from_stash(env, "wrong_rng")
    st = rio.load_checkpoint(ckpt_of(out))
    st["rng"]["gen"] = torch.Generator().manual_seed(123).get_state()
    rio.save_checkpoint(ckpt_of(out), st)
    assert "after round 2" in resume(env, out, caplog)
    with pytest.raises(AssertionError):
        assert_same_metrics(env["ref"], out)


# ------------------------------------------------------------------------------------------ determinism
def test_same_config_and_seed_give_identical_metrics_and_provenance(env):
    out = env["root"] / "runs" / "again"
    experiment.run_cell(make_cfg(), env["data"], env["part"], out)
    assert_same_metrics(env["ref"], out)
    for name in ("rounds.csv", "clients.csv", "run.json"):
        assert (out / name).exists()
    run = json.loads((out / "run.json").read_text())
    assert run["config"] == make_cfg().to_dict() and run["seed"] == 0
    assert {"python", "torch", "numpy", "robustfl"} <= set(run["versions"])
    assert run["versions"]["torch"] == torch.__version__
    assert run["device"].startswith("cpu")
    assert isinstance(run["git_commit"], str) and run["git_commit"]
    last = pd.read_csv(out / "rounds.csv").iloc[-1]
    assert run["final"]["test_acc"] == pytest.approx(float(last["test_acc"]), abs=1e-6)


# ------------------------------------------------------------------------------- the defenses' state
@pytest.mark.parametrize("defense", ["foolsgold", "centered_clipping", "signguard"])
def test_a_defense_with_state_or_randomness_resumes_to_identical_metrics(env, caplog, defense):
    """FoolsGold's history, centered clipping's centre and the server's random stream (SignGuard's
    coordinates) are part of the checkpoint: a run stopped after round 2 ends as the uninterrupted one."""
    kw = {"defense": defense, "attack": "krum_backdoor", "n_attackers": 1, "defense_params":
          {"tau": 0.05} if defense == "centered_clipping" else {}}
    ref = env["root"] / "runs" / f"{defense}-ref"
    experiment.run_cell(make_cfg(**kw), env["data"], env["part"], ref)
    out = env["root"] / "runs" / f"{defense}-resumed"
    run_interrupted(make_cfg(**kw), env["data"], env["part"], out)
    state = rio.load_checkpoint(ckpt_of(out))["defense_state"]
    if defense != "signguard":
        assert state, "the defense's memory is in the checkpoint"
    assert "after round 2" in resume(env, out, caplog, **kw)
    assert_same_metrics(ref, out)
