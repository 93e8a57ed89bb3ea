"""Golden runs: a fixed set of digits cells (every attack, every defense, the sequential and vectorised
engines, alone and packed) whose ``rounds.csv`` and ``clients.csv`` must stay byte-identical on the CPU, wall-clock columns
(``*_s``) aside. A change that is meant to change results regenerates them on purpose:
``ROBUSTFL_REGEN_GOLDEN=1 pytest tests/test_golden.py`` (then review the diff of tests/golden/)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest

from robustfl.data import datasets as data
from robustfl.fl import experiment
from robustfl.config import RunConfig

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("ROBUSTFL_REGEN_GOLDEN") == "1"
BASE = {"dataset": "digits", "rounds": 2, "local_epochs": 1, "batch_size": 32, "device": "cpu"}

# name -> cell fields (on top of BASE). Every registered attack and defense appears at least once.
SINGLE: dict[str, dict] = {
    "fedavg": {},
    "fedavg_sequential": {"engine": {"kind": "sequential"}},
    "krum": {"defense": "krum"},
    "median": {"defense": "median"},
    "trimmed_mean": {"defense": "trimmed_mean"},
    "bulyan": {"defense": "bulyan", "defense_params": {"f": 1}},
    "flare": {"defense": "flare"},
    "fltrust": {"defense": "fltrust"},
    # the defense suite (robustfl.aggregation.suite). Recorded with a fresh ServerContext.state and no generator
    # each round (fixed-seed fallback): regenerate these when the FL loop passes state and a generator.
    "geomed": {"defense": "geomed"},
    "centered_clipping": {"defense": "centered_clipping", "attack": "krum_untargeted", "n_attackers": 2},
    "dnc": {"defense": "dnc", "attack": "trimmedmean_untargeted", "n_attackers": 2},
    "signguard": {"defense": "signguard"},
    "flame": {"defense": "flame", "attack": "krum_backdoor", "n_attackers": 1},
    "foolsgold": {"defense": "foolsgold"},
    "norm_clipping": {"defense": "norm_clipping"},
    "weak_dp": {"defense": "weak_dp"},
    "median_pre_nnm_bucketing": {"defense": "median", "defense_params": {"pre": ["nnm", {"name": "bucketing", "s": 2}]}},
    "krum_backdoor_krum": {"attack": "krum_backdoor", "n_attackers": 1, "defense": "krum"},
    "krum_backdoor_ball_fedavg": {"attack": "krum_backdoor", "n_attackers": 1,
                                  "attack_params": {"radius": 0.5, "start": "benign_mean"}},
    "krum_backdoor_code_flare": {"attack": "krum_backdoor", "n_attackers": 1, "defense": "flare",
                                 "attack_params": {"variant": "code"}},
    "median_backdoor_median": {"attack": "median_backdoor", "n_attackers": 1, "defense": "median"},
    "krum_untargeted_krum": {"attack": "krum_untargeted", "n_attackers": 2, "defense": "krum"},
    "trimmedmean_untargeted_tm": {"attack": "trimmedmean_untargeted", "n_attackers": 2, "defense": "trimmed_mean"},
    "adaptive_plr_flare": {"attack": "adaptive_plr", "n_attackers": 2, "defense": "flare"},
    "minmax_median": {"attack": "minmax", "n_attackers": 2, "defense": "median"},
    "minsum_krum_unit": {"attack": "minsum", "n_attackers": 2, "defense": "krum",
                         "attack_params": {"direction": "unit"}},
    "agr_tailored_krum": {"attack": "agr_tailored", "n_attackers": 2, "defense": "krum",
                          "attack_params": {"batch": 6, "tau": 1e-3}},
    "krum_backdoor_sequential": {"attack": "krum_backdoor", "n_attackers": 1, "defense": "krum",
                                 "engine": {"kind": "sequential"}},
    # on the CPU `engine: auto` is the sequential loop: the vectorised engine's paths explicitly
    "fedavg_vectorised": {"engine": {"kind": "vectorised"}},
    "fedavg_vectorised_grouped": {"engine": {"kind": "vectorised", "conv": "grouped"}},
    "krum_backdoor_krum_vectorised": {"attack": "krum_backdoor", "n_attackers": 1, "defense": "krum",
                                      "engine": {"kind": "vectorised"}},
    "adaptive_plr_flare_vectorised": {"attack": "adaptive_plr", "n_attackers": 2, "defense": "flare",
                                      "engine": {"kind": "vectorised", "conv": "grouped"}},
    # the untargeted Byzantine attacks (robustfl.attacks.byzantine)
    "alie_trimmed_mean": {"attack": "alie", "n_attackers": 3, "defense": "trimmed_mean"},
    "ipm_median": {"attack": "ipm", "n_attackers": 2, "defense": "median"},
    "sign_flip_krum": {"attack": "sign_flip", "n_attackers": 2, "defense": "krum"},
    "gaussian_fedavg": {"attack": "gaussian", "n_attackers": 2},
    "label_flip_median": {"attack": "label_flip", "n_attackers": 2, "defense": "median"},
    "label_flip_median_vectorised": {"attack": "label_flip", "n_attackers": 2, "defense": "median",
                                     "engine": {"kind": "vectorised", "conv": "grouped"}},
    # the backdoor suite (robustfl.attacks.backdoor_suite)
    "model_replacement_fedavg": {"attack": "model_replacement", "n_attackers": 1},
    "dba_fedavg_vectorised": {"attack": "dba", "n_attackers": 2, "backdoor": "trojan", "backdoor_mode": "multiple",
                              "engine": {"kind": "vectorised", "conv": "grouped"}},
    "neurotoxin_median": {"attack": "neurotoxin", "n_attackers": 1, "defense": "median"},
}
# trained together in one process (robustfl.fl.experiment.run_cells)
PACKED: dict[str, dict] = {
    "packed_fedavg": {},
    "packed_krum_backdoor_krum": {"attack": "krum_backdoor", "n_attackers": 1, "defense": "krum", "seed": 1},
    "packed_median_backdoor_fltrust": {"attack": "median_backdoor", "n_attackers": 1, "defense": "fltrust"},
    "packed_trimmedmean_untargeted_bulyan": {"attack": "trimmedmean_untargeted", "n_attackers": 1,
                                             "defense": "bulyan", "defense_params": {"f": 1}},
    "packed_adaptive_plr_flare": {"attack": "adaptive_plr", "n_attackers": 2, "defense": "flare"},
    "packed_label_flip_median": {"attack": "label_flip", "n_attackers": 2, "defense": "median"},
}
FILES = ("rounds.csv", "clients.csv")


def _cfg(fields: dict) -> RunConfig:
    return RunConfig.from_dict({**BASE, **fields})


def canonical(text: str) -> str:
    """The CSV with its wall-clock columns (names ending in ``_s``) emptied; everything else verbatim."""
    rows = list(csv.reader(io.StringIO(text)))
    drop = {i for i, name in enumerate(rows[0]) if name.endswith("_s")}
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(rows[0])
    for r in rows[1:]:
        w.writerow(["" if i in drop else v for i, v in enumerate(r)])
    return out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("golden")
    d = data.prepare("digits", {}, tmp / "digits")

    def part(cfg: RunConfig) -> Path:
        p = tmp / "parts" / f"{experiment.partition_key(cfg)}.npz"
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            experiment.build_partition(d, cfg, p)
        return p

    out: dict[str, Path] = {}
    for name, fields in SINGLE.items():
        cfg = _cfg(fields)
        out[name] = tmp / "runs" / name
        experiment.run_cell(cfg, d, part(cfg), out[name])
    cfgs = [_cfg(f) for f in PACKED.values()]
    for name in PACKED:
        out[name] = tmp / "runs" / name
    experiment.run_cells(cfgs, d, [part(c) for c in cfgs], [out[n] for n in PACKED])
    return out


def test_every_attack_and_defense_is_covered() -> None:
    from robustfl.attacks import ATTACKS
    from robustfl.aggregation.defenses import DEFENSES

    cells = [*SINGLE.values(), *PACKED.values()]
    assert set(ATTACKS.names()) <= {c.get("attack") for c in cells}
    assert set(DEFENSES.names()) <= {c.get("defense", "fedavg") for c in cells}


def test_canonical_empties_only_wall_clock_columns() -> None:
    text = "round,test_acc,train_s,agg_s\n1,0.5,2.7,0.01\n2,0.6,,0.02\n"
    assert canonical(text) == "round,test_acc,train_s,agg_s\n1,0.5,,\n2,0.6,,\n"


@pytest.mark.parametrize("name", [*SINGLE, *PACKED])
def test_golden_run_is_unchanged(runs: dict[str, Path], name: str) -> None:
    for fname in FILES:
        got = canonical((runs[name] / fname).read_text())
        want = GOLDEN / name / fname
        if REGEN:
            want.parent.mkdir(parents=True, exist_ok=True)
            want.write_text(got)
        assert want.exists(), f"no golden file {want}; regenerate with ROBUSTFL_REGEN_GOLDEN=1"
        assert got == want.read_text(), f"{name}/{fname} differs from its golden copy"
