"""Per-run outputs -> tidy frames -> seed-aggregated summary (the numbers behind Tables 2-5).

A run directory holds ``rounds.csv``, ``clients.csv``, ``run.json`` (docs/architecture.md, "Per-run
outputs"). :func:`collect_runs` stacks many runs into two long frames with the cell's configuration
flattened onto every row; :func:`summarise` reduces them to one row per cell (all configuration
columns except ``seed``) with the mean, sample standard deviation (ddof = 1) and count over seeds of
each run's final metrics and round-averaged metrics (``asr_rounds``, the paper's ASR). The paper
averages three runs per cell (Section 6.1).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from robustfl.io import atomic_write_text
from robustfl.data.serversets import resolve_aux_class

#: Configuration flattened onto every row of the collected frames; all but ``seed`` identify a cell.
CONFIG_COLUMNS: tuple[str, ...] = (
    "study", "cell_id", "dataset", "attack", "attack_variant", "backdoor", "backdoor_mode", "defense",
    "defense_variant", "defense_options", "partition", "c_sel", "alpha", "n_clients", "n_attackers", "aux_size", "aux_class", "seed",
)
#: The columns a cell is grouped by when averaging over seeds.
KEY_COLUMNS: tuple[str, ...] = tuple(c for c in CONFIG_COLUMNS if c != "seed")

ROUND_COLUMNS: tuple[str, ...] = (
    "round", "test_acc", "test_loss", "asr", "target_conf", "train_s", "attack_s", "agg_s", "n_excluded",
)
#: Per-round attack diagnostics that runs written before they existed lack (NaN when read), over the
#: attackers (NaN without attackers): ``mal_dist_ratio`` the mean of their ``dist_ratio``, ``mal_krum_rank``
#: their best (smallest) ``krum_rank``, ``mal_selected`` the fraction of them the defense gave a positive weight.
ROUND_OPTIONAL_COLUMNS: tuple[str, ...] = ("mal_dist_ratio", "mal_krum_rank", "mal_selected")
CLIENT_COLUMNS: tuple[str, ...] = ("round", "client", "malicious", "weight", "detected")
#: Per-client columns that runs written before they existed lack (NaN when read), in the order they were
#: introduced: ``update_norm`` is the L2 norm of the client's update delta_i as the server received it
#: (NaN/Inf if it held NaN/Inf); ``dist_ratio`` = ||delta_i - mu_B|| / s, the distance to the mean mu_B of
#: the round's benign updates over their RMS distance s to it; ``krum_rank`` the update's place (1 = chosen)
#: in Krum's order with f = max(attackers, 1), whatever the cell's defense; ``selected`` = 1 if the defense
#: gave the client a positive weight (:func:`robustfl.fl.metrics.attack_diagnostics`).
CLIENT_OPTIONAL_COLUMNS: tuple[str, ...] = ("update_norm", "dist_ratio", "krum_rank", "selected")

#: Metrics taken from a run's last evaluated round (final model quality).
FINAL_METRICS: tuple[str, ...] = ("test_acc", "test_loss", "asr", "target_conf")
#: Metrics averaged over the rounds of a run that hold a value: (summary name, per-round column).
#: ``asr_rounds`` = (1/|R|) sum_{r in R} ASR_r over the evaluated rounds R, ASR_r the share of targeted
#: inputs the global model predicts as the target label after round r's aggregation: the paper's ASR
#: (Section 6.2) counted per round as the authors' code does; with one targeted input (``single``) the
#: fraction of rounds in which the attack succeeds.
ROUND_MEAN_METRICS: tuple[tuple[str, str], ...] = (("asr_rounds", "asr"),)
#: Metrics averaged over a run's rounds (per-round cost, Section 7.4).
TIME_METRICS: tuple[str, ...] = ("train_s", "attack_s", "agg_s")

#: Attacks that have a backdoor (semantic / trojan) target; the others get ``backdoor = "none"``.
BACKDOOR_ATTACKS: frozenset[str] = frozenset({"krum_backdoor", "median_backdoor", "adaptive_plr",
                                              "model_replacement", "dba", "neurotoxin"})
#: Keys of ``partition_params`` accepted for Sattler et al.'s classes-per-client (Section 7.3.2).
C_SEL_KEYS: tuple[str, ...] = ("c_sel", "classes_per_client", "n_classes", "classes", "k")


# --------------------------------------------------------------------------------------- writing
def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (no index) atomically; returns the path."""
    return atomic_write_text(path, df.to_csv(index=False))


# --------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class RunResult:
    """One run directory: per-round metrics, per-client weights and ``run.json``."""

    run_dir: Path
    rounds: pd.DataFrame
    clients: pd.DataFrame
    meta: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def keys(self) -> dict[str, Any]:
        """The flattened configuration columns (:data:`CONFIG_COLUMNS`) of this run."""
        return config_columns(self.meta)


def _read_csv(path: Path, required: Iterable[str]) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    return df


def load_run(run_dir: str | os.PathLike[str]) -> RunResult:
    """Read one run directory; ``clients.csv`` may be absent (empty frame), the others may not."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no run.json (is this a run directory?)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta.get("config"), Mapping):
        raise ValueError(f"{meta_path}: no 'config' object")
    rounds = _read_csv(run_dir / "rounds.csv", ROUND_COLUMNS).sort_values("round", ignore_index=True)
    for c in ROUND_OPTIONAL_COLUMNS:
        if c not in rounds:
            rounds[c] = math.nan
    clients_path = run_dir / "clients.csv"
    if clients_path.is_file():
        clients = _read_csv(clients_path, CLIENT_COLUMNS)
    else:
        clients = pd.DataFrame({c: pd.Series(dtype=float) for c in CLIENT_COLUMNS})
    for c in CLIENT_OPTIONAL_COLUMNS:
        if c not in clients:
            clients[c] = math.nan
    return RunResult(run_dir=run_dir, rounds=rounds, clients=clients, meta=meta)


def _first_param(params: Mapping[str, Any], keys: Iterable[str]) -> float:
    for k in keys:
        if params.get(k) is not None:
            return float(params[k])
    return math.nan


def params_label(params: Mapping[str, Any]) -> str:
    """A compact, order-independent label of an options mapping: ``"default"`` when empty, else
    ``"k1=v1 k2=v2"`` sorted by key."""
    if not params:
        return "default"
    return " ".join(f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v}"
                    for k, v in sorted(params.items()))


def config_columns(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten ``run.json`` into the :data:`CONFIG_COLUMNS` of a run.

    ``backdoor`` and ``backdoor_mode`` are ``"none"`` for attacks without a backdoor target;
    ``attack_variant`` is :func:`params_label` of ``attack_params``; ``defense_variant`` is
    ``defense_params["variant"]`` (e.g. ``"code"`` for the authors'-code FLARE) or ``"default"``, and
    ``defense_options`` :func:`params_label` of all of ``defense_params``;
    ``c_sel`` / ``alpha`` are NaN unless the partition is ``classes`` / ``dirichlet``;
    ``aux_class`` is FLARE's auxiliary class as the run resolved it
    (:func:`robustfl.data.serversets.resolve_aux_class`).
    """
    cfg = meta.get("config", {})
    cell = meta.get("cell") or {}
    attack = str(cfg.get("attack", "none"))
    partition = str(cfg.get("partition", "iid"))
    pparams = cfg.get("partition_params") or {}
    dparams = cfg.get("defense_params") or {}
    dataset = str(cfg.get("dataset", ""))
    backdoor = str(cfg.get("backdoor", "semantic")) if attack in BACKDOOR_ATTACKS else "none"
    mode = str(cfg.get("backdoor_mode", "single")) if attack in BACKDOOR_ATTACKS else "none"
    aux = resolve_aux_class(dataset, cfg.get("aux_class"), (backdoor, mode) if backdoor != "none" else None,
                            warn=False)
    return {
        "study": str(cell.get("study", "")),
        "cell_id": str(cell.get("cell_id", "")),
        "dataset": dataset,
        "attack": attack,
        "attack_variant": params_label(cfg.get("attack_params") or {}),
        "backdoor": backdoor,
        "backdoor_mode": mode,
        "defense": str(cfg.get("defense", "")),
        "defense_variant": str(dparams.get("variant") or "default"),
        "defense_options": params_label(dparams),
        "partition": partition,
        "c_sel": _first_param(pparams, C_SEL_KEYS) if partition == "classes" else math.nan,
        "alpha": _first_param(pparams, ("alpha",)) if partition == "dirichlet" else math.nan,
        "n_clients": int(cfg.get("n_clients", 0)),
        "n_attackers": int(cfg.get("n_attackers", 0)),
        "aux_size": int(cfg.get("aux_size", 0)),
        "aux_class": aux,
        "seed": int(cfg.get("seed", 0)),
    }


def _with_keys(df: pd.DataFrame, keys: Mapping[str, Any], run: RunResult) -> pd.DataFrame:
    head = pd.DataFrame({k: [v] * len(df) for k, v in keys.items()}, index=df.index)
    head["run_dir"] = str(run.run_dir)
    head["device"] = str(run.meta.get("device", ""))
    return pd.concat([head, df], axis=1)


def collect_runs(run_dirs: Iterable[str | os.PathLike[str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stack runs into ``(rounds_df, clients_df)`` with :data:`CONFIG_COLUMNS`, ``run_dir`` and
    ``device`` on every row."""
    rounds, clients = [], []
    for d in dict.fromkeys(Path(p) for p in run_dirs):  # a run listed twice is read once
        run = load_run(d)
        keys = run.keys
        rounds.append(_with_keys(run.rounds, keys, run))
        clients.append(_with_keys(run.clients, keys, run))
    extra = ("run_dir", "device")
    if not rounds:
        empty = lambda cols: pd.DataFrame(columns=[*CONFIG_COLUMNS, *extra, *cols])  # noqa: E731
        return empty((*ROUND_COLUMNS, *ROUND_OPTIONAL_COLUMNS)), empty((*CLIENT_COLUMNS, *CLIENT_OPTIONAL_COLUMNS))
    return pd.concat(rounds, ignore_index=True), pd.concat(clients, ignore_index=True)


def find_run_dirs(root: str | os.PathLike[str]) -> list[Path]:
    """All directories under ``root`` (itself included) that hold a ``run.json``, sorted."""
    return sorted(p.parent for p in Path(root).rglob("run.json"))


# ----------------------------------------------------------------------------------- summarising
def _last_valid(s: pd.Series) -> float:
    v = s.dropna()
    return float(v.iloc[-1]) if len(v) else math.nan


def final_metrics(rounds_df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: each final metric's last non-NaN value (by round), each round-averaged metric's
    mean over the rounds that hold a value (:data:`ROUND_MEAN_METRICS`) and the per-round mean of the
    timing columns."""
    run_cols = [c for c in (*CONFIG_COLUMNS, "run_dir") if c in rounds_df.columns]
    df = rounds_df.sort_values([*run_cols, "round"], kind="stable")
    g = df.groupby(run_cols, dropna=False, sort=True)
    parts = {m: g[m].agg(_last_valid) for m in FINAL_METRICS if m in df.columns}
    parts.update({name: g[col].mean() for name, col in ROUND_MEAN_METRICS if col in df.columns})  # NaN skipped
    parts.update({m: g[m].mean() for m in TIME_METRICS if m in df.columns})
    parts["final_round"] = g["round"].max()
    if "device" in df.columns:
        parts["device"] = g["device"].first()
    return pd.DataFrame(parts).reset_index()


def summarise(rounds_df: pd.DataFrame) -> pd.DataFrame:
    """Per cell (:data:`KEY_COLUMNS`): ``{metric}_mean``, ``{metric}_std`` (ddof = 1, NaN for one
    seed), ``{metric}_n`` (runs with a value) over seeds, plus ``n_seeds``, ``seeds`` and ``devices``.

    NaN metrics (ASR and target confidence of untargeted / attack-free runs) stay NaN with n = 0.
    ``asr`` is the final round's ASR, ``asr_rounds`` the paper's (:data:`ROUND_MEAN_METRICS`).
    """
    per_run = final_metrics(rounds_df)
    keys = [c for c in KEY_COLUMNS if c in per_run.columns]
    round_mean = tuple(name for name, _ in ROUND_MEAN_METRICS)
    metrics = [m for m in (*FINAL_METRICS, *round_mean, *TIME_METRICS) if m in per_run.columns]
    g = per_run.groupby(keys, dropna=False, sort=True)
    out = pd.DataFrame(index=g.size().index)
    for m in metrics:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
        out[f"{m}_n"] = g[m].count()
    out["n_seeds"] = g["seed"].nunique() if "seed" in per_run.columns else g.size()
    out["n_runs"] = g.size()
    if "seed" in per_run.columns:
        out["seeds"] = g["seed"].agg(lambda s: " ".join(str(int(x)) for x in sorted(set(s))))
    if "device" in per_run.columns:
        out["devices"] = g["device"].agg(lambda s: ";".join(sorted(set(map(str, s)))))
    return out.reset_index()


def summarise_runs(run_dirs: Iterable[str | os.PathLike[str]],
                   out_csv: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """:func:`collect_runs` + :func:`summarise`, optionally written atomically to ``out_csv``."""
    rounds_df, _ = collect_runs(run_dirs)
    summary = summarise(rounds_df)
    if out_csv is not None:
        write_csv(summary, out_csv)
    return summary


# ------------------------------------------------------------------------------------- restoring
def _present(df: pd.DataFrame, required: Iterable[str], optional: Iterable[str]) -> list[str]:
    """The required columns and the optional ones ``df`` holds a value of."""
    return [*required, *(c for c in optional if c in df and df[c].notna().any())]


def restore_runs(rounds_df: pd.DataFrame, clients_df: pd.DataFrame, metas: Mapping[str, Mapping[str, Any]],
                 results_dir: str | os.PathLike[str]) -> list[Path]:
    """The inverse of :func:`collect_runs` for archived results: write ``rounds.csv``, ``clients.csv`` and
    ``run.json`` of every run in ``rounds_df`` under ``<results_dir>/runs/<cell_id>/seed<seed>``, so that a
    later study can aggregate runs whose directories were not kept (only their tidy frames and
    ``run.json``; ``snapshot.npz`` cannot be restored). ``metas[cell_id]`` is the run's ``run.json``; its
    seed must match. Writes nothing over an existing ``run.json``. Returns the restored directories."""
    out = []
    for (cid, seed), rounds in rounds_df.groupby(["cell_id", "seed"], sort=True):
        meta = metas.get(cid)
        if meta is None:
            raise ValueError(f"no run.json given for cell {cid!r}")
        meta_seed = meta.get("seed", meta.get("config", {}).get("seed"))
        if meta_seed is None or int(meta_seed) != int(seed):
            raise ValueError(f"run.json of {cid!r} is for seed {meta_seed}, the rows for seed {seed}")
        run_dir = Path(results_dir) / "runs" / str(cid) / f"seed{int(seed)}"
        if (run_dir / "run.json").exists():
            raise FileExistsError(f"{run_dir} already holds a run; not overwritten")
        clients = clients_df[(clients_df["cell_id"] == cid) & (clients_df["seed"] == seed)]
        atomic_write_text(run_dir / "rounds.csv",
                          rounds[_present(rounds, ROUND_COLUMNS, ROUND_OPTIONAL_COLUMNS)].sort_values("round")
                          .to_csv(index=False))
        atomic_write_text(run_dir / "clients.csv",
                          clients[_present(clients, CLIENT_COLUMNS, CLIENT_OPTIONAL_COLUMNS)]
                          .sort_values(["round", "client"]).to_csv(index=False))
        atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=1, sort_keys=True))  # last: marks done
        out.append(run_dir)
    return out


__all__ = [
    "CLIENT_COLUMNS", "CLIENT_OPTIONAL_COLUMNS", "CONFIG_COLUMNS", "KEY_COLUMNS", "ROUND_COLUMNS",
    "ROUND_MEAN_METRICS", "ROUND_OPTIONAL_COLUMNS", "RunResult",
    "collect_runs", "config_columns", "final_metrics", "params_label",
    "find_run_dirs", "load_run", "restore_runs", "summarise", "summarise_runs", "write_csv",
]
