"""Paper tables: our seed-aggregated results (``results.summarise``) beside the published numbers.

Published values live in ``robustfl/reporting/paper/*.csv`` (transcribed from the paper, see its README).
:func:`build_table` returns a long frame, one row per (cell, metric): ``ours_mean``, ``ours_std``,
``n`` (seeds), ``paper`` and ``diff = ours_mean - paper``, in the paper's unit (accuracy and Table 3
ASR in %, Table 5 ASR as a fraction). Cells we did not run keep empty ``ours_*``; cells the paper does
not report keep an empty ``paper``. Nothing is filled in. :func:`pivot` lays the long frame out like
the paper's table; :func:`write_table` writes ``.csv``, ``.md`` and ``.tex`` atomically.

ASR is the paper's by default (``asr="rounds"``: ``asr_rounds`` of ``results.summarise``, the per-round
ASR averaged over the run's rounds); ``asr="final"`` shows the final round's instead. Captions say which.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from robustfl.io import atomic_write_text

#: Where the transcribed paper numbers live (repository checkout).
PAPER_DIR = Path(__file__).resolve().parent / "paper"  # package data (pyproject.toml)

DATASET_NAMES = {"fmnist": "fMNIST", "cifar10": "CIFAR-10", "kather": "Kather", "digits": "Digits (stand-in)"}
#: Datasets the paper does not use (offline stand-ins): their rows never carry a paper value
STAND_INS = {"digits": "scikit-learn's 8x8 digits"}
DEFENSE_NAMES = {
    "fedavg": "FedAvg", "krum": "Krum", "median": "Coomed", "trimmed_mean": "TrimmedMean",
    "bulyan": "Bulyan", "fltrust": "FLTrust", "flare": "FLARE",
    "geomed": "GeoMed (RFA)", "centered_clipping": "CenteredClipping", "dnc": "DnC", "signguard": "SignGuard",
    "flame": "FLAME", "foolsgold": "FoolsGold", "norm_clipping": "NormClipping", "weak_dp": "WeakDP",
}
ATTACK_NAMES = {
    "none": "No attack",
    "krum_backdoor": "Attack-Krum-Backdoor",
    "median_backdoor": "Attack-Coomed-Backdoor",
    "krum_untargeted": "Attack-Krum-Untargeted",
    "trimmedmean_untargeted": "Attack-TrimmedMean-Untargeted",
    "adaptive_plr": "Adaptive attack (Sec. 7.4)",
    "alie": "ALIE",
    "ipm": "IPM",
    "sign_flip": "SignFlipping",
    "gaussian": "Gaussian",
    "label_flip": "LabelFlipping",
    "model_replacement": "Model replacement (Bagdasaryan et al.)",
    "dba": "DBA (Xie et al.)",
    "neurotoxin": "Neurotoxin (Zhang et al.)",
    "minmax": "Min-Max",
    "minsum": "Min-Sum",
    "agr_tailored": "AGR-tailored",
}
METRIC_NAMES = {"acc": "Acc", "asr": "ASR"}
#: The ASR a table can show: option of :func:`build_table` -> (summary metric, caption sentence).
ASR_DEFINITIONS: dict[str, tuple[str, str]] = {
    "rounds": ("asr_rounds", "ASR: per round, the share of targeted inputs the global model predicts as the "
                             "target label after aggregation, averaged over the run's rounds (the paper's ASR, "
                             "Section 6.2, counted per round as the authors' code does; with one targeted "
                             "input, the fraction of rounds in which the attack succeeds)."),
    "final": ("asr", "ASR: the share of targeted inputs the final global model (last round) predicts as the "
                     "target label."),
}
_ORDER = {"dataset": list(DATASET_NAMES), "defense": list(DEFENSE_NAMES), "attack": list(ATTACK_NAMES)}


def display(kind: str, value: Any) -> str:
    """Paper display name of a config value (``kind`` in dataset / defense / attack / metric)."""
    table = {"dataset": DATASET_NAMES, "defense": DEFENSE_NAMES, "attack": ATTACK_NAMES,
             "metric": METRIC_NAMES}[kind]
    return table.get(value, str(value))


@dataclass(frozen=True)
class TableSpec:
    """How one paper table is matched: which published CSV, which of our cells, which metrics."""

    name: str
    caption: str
    grid_csv: str | None  # robustfl/reporting/paper file whose key rows form the expected grid (None: our cells only)
    paper_csv: str | None  # file with the published values (None: the paper prints none)
    keys: tuple[str, ...]  # join keys between ours and the paper
    # (paper column, summary metric, scale to paper unit); summary metric "asr" stands for the ASR chosen
    # by build_table's ``asr`` (ASR_DEFINITIONS)
    metrics: tuple[tuple[str, str, float], ...]
    filters: Mapping[str, Any] = field(default_factory=dict)  # equality filters on our summary
    extra_keys: tuple[str, ...] = ("defense_variant",)  # our-only keys kept apart (never joined)
    rows: tuple[str, ...] = ("dataset",)  # pivot row labels
    decimals: int = 1
    unit: str = "%"


_DEFAULT = {"partition": "iid", "n_clients": 10, "aux_size": 10}
_SINGLE = {**_DEFAULT, "n_attackers": 1, "backdoor_mode": "single"}  # the paper's target (authors' code)
SPECS: dict[str, TableSpec] = {
    "table2": TableSpec(
        "table2", "Table 2: model accuracy (%) in the attack-free scenario.", "table2.csv", "table2.csv",
        ("dataset", "defense"), (("acc", "test_acc", 100.0),),
        {**_DEFAULT, "attack": "none", "n_attackers": 0}, decimals=2),
    "table3": TableSpec(
        "table3", "Table 3: accuracy (%) and ASR (%) under semantic backdoor attacks (target: one training "
        "image of class 4 relabelled 3).", "table3.csv",
        "table3.csv", ("attack", "dataset", "defense"), (("acc", "test_acc", 100.0), ("asr", "asr", 100.0)),
        {**_SINGLE, "backdoor": "semantic"}, rows=("attack", "dataset")),
    "table3_multiple": TableSpec(
        "table3_multiple", "Table 3 with 20 targeted inputs (backdoor_mode multiple: the semantic rule's 20 "
        "training images, e.g. CIFAR-10 green cars relabelled bird): accuracy (%) and ASR (%).", "table3.csv",
        "table3.csv", ("attack", "dataset", "defense"), (("acc", "test_acc", 100.0), ("asr", "asr", 100.0)),
        {**_SINGLE, "backdoor": "semantic", "backdoor_mode": "multiple"}, rows=("attack", "dataset")),
    "table3_trojan": TableSpec(
        "table3_trojan", "Trojan backdoor attacks (the paper shows these only as Figures 7-9): "
        "accuracy (%) and ASR (%) (target: one training image of class 4 with the trigger, relabelled 3).",
        "table3.csv", None, ("attack", "dataset", "defense"),
        (("acc", "test_acc", 100.0), ("asr", "asr", 100.0)),
        {**_SINGLE, "backdoor": "trojan"}, rows=("attack", "dataset")),
    "table4": TableSpec(
        "table4", "Table 4: model accuracy (%) under untargeted attacks.", "table4.csv", "table4.csv",
        ("attack", "dataset", "defense"), (("acc", "test_acc", 100.0),),
        {**_DEFAULT, "n_attackers": 3}, rows=("attack", "dataset")),
    "table5": TableSpec(
        "table5", "Table 5: ASR (fraction) in the non-i.i.d. scenario (fMNIST).", "table5.csv", "table5.csv",
        ("attack", "dataset", "defense"), (("asr", "asr", 1.0),),
        {**_SINGLE, "partition": "classes", "backdoor": "semantic"},
        extra_keys=("defense_variant", "c_sel"), rows=("attack", "dataset", "c_sel"), decimals=3,
        unit="fraction"),
    "aux_ablation": TableSpec(
        "aux_ablation", "FLARE's auxiliary class (not in the paper): accuracy (%) and ASR (%) of FLARE under "
        "the semantic backdoor attacks, target one training image of class 4 relabelled 3, per auxiliary class "
        "(4: the target's source class, 3: its target class, 1: an unrelated class, the authors' code's).",
        None, None, ("attack", "dataset", "aux_class", "defense"),
        (("acc", "test_acc", 100.0), ("asr", "asr", 100.0)),
        {**_SINGLE, "backdoor": "semantic", "defense": "flare"}, rows=("attack", "dataset", "aux_class")),
}
TABLES: tuple[str, ...] = tuple(SPECS)


def load_paper(csv_name: str, paper_dir: str | os.PathLike[str] = PAPER_DIR) -> pd.DataFrame:
    """Read one transcribed paper CSV (``robustfl/reporting/paper/<csv_name>``)."""
    return pd.read_csv(Path(paper_dir) / csv_name)


def _sort(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Sort in the paper's order (known names first, in paper order; others alphabetically)."""
    def key(s: pd.Series) -> pd.Series:
        order = _ORDER.get(s.name)
        if order is None:
            return s
        return s.map(lambda v: (order.index(v), "") if v in order else (len(order), str(v)))
    return df.sort_values(list(cols), key=key, kind="stable", ignore_index=True)


def _paper_long(spec: TableSpec, paper_dir: str | os.PathLike[str]) -> pd.DataFrame:
    if spec.grid_csv is None:
        return pd.DataFrame(columns=[*spec.keys, "metric", "paper"])
    grid = load_paper(spec.grid_csv, paper_dir)[list(spec.keys)].drop_duplicates()
    rows = []
    for col, _, _ in spec.metrics:
        part = grid.copy()
        part["metric"] = col
        part["paper"] = math.nan
        if spec.paper_csv is not None:
            paper = load_paper(spec.paper_csv, paper_dir)
            vals = paper.set_index(list(spec.keys))[col]
            part["paper"] = [float(vals.loc[tuple(r)]) for r in grid.itertuples(index=False)]
        rows.append(part)
    return pd.concat(rows, ignore_index=True)


def _select(summary: pd.DataFrame, spec: TableSpec, grid: pd.DataFrame,
            filters: Mapping[str, Any], study: str | None) -> pd.DataFrame:
    """Our cells for this table: filters applied, attacks restricted to the table's attacks."""
    df = summary
    for k, v in filters.items():
        if v is not None and k in df.columns:
            df = df[df[k] == v]
    if "attack" in spec.keys and spec.grid_csv is not None:
        df = df[df["attack"].isin(set(grid["attack"]))]
    if study is not None:
        df = df[df["study"] == study]
    ours_keys = [*spec.keys, *(k for k in spec.extra_keys if k in df.columns)]
    df = df.sort_values(["n_seeds", "study", "cell_id"], ascending=[False, True, True], kind="stable")
    dup = df.duplicated(ours_keys, keep="first")
    if dup.any():
        dropped = df.loc[dup, ["study", "cell_id"]].astype(str).agg("/".join, axis=1).tolist()
        warnings.warn(f"{spec.name}: several cells match the same table cell; kept the one with the most "
                      f"seeds, dropped {dropped} (pass study= to choose)", stacklevel=3)
    return df[~dup]


def build_table(summary: pd.DataFrame, name: str, *, study: str | None = None,
                filters: Mapping[str, Any] | None = None, asr: str = "rounds",
                paper_dir: str | os.PathLike[str] = PAPER_DIR) -> pd.DataFrame:
    """Long table for paper table ``name`` (:data:`TABLES`): ours (mean, std, n) + paper + diff.

    ``filters`` updates the spec's equality filters on the summary (a value of ``None`` drops one);
    ``study`` keeps only that study's cells; ``asr`` picks the ASR shown (:data:`ASR_DEFINITIONS`:
    ``"rounds"``, the paper's, or ``"final"``, the last round's). Column ``summary_metric`` names the
    summary metric behind each row.
    """
    if name not in SPECS:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    if asr not in ASR_DEFINITIONS:
        raise ValueError(f"unknown ASR definition asr={asr!r}; known: {', '.join(ASR_DEFINITIONS)}")
    spec = SPECS[name]
    flt = {**spec.filters, **(filters or {})}
    missing = [k for k in spec.keys if k not in summary.columns]
    if missing:
        raise ValueError(f"{name}: the summary lacks column(s) {missing}; summarise the runs again with "
                         "robustfl.reporting.results.summarise")
    paper = _paper_long(spec, paper_dir)
    ours = _select(summary, spec, paper, flt, study)
    extra = [k for k in spec.extra_keys if k in ours.columns]
    shown = {col: ASR_DEFINITIONS[asr][0] if m == "asr" else m for col, m, _ in spec.metrics}  # summary metric
    parts = []
    for col, _, scale in spec.metrics:
        metric = shown[col]
        if f"{metric}_mean" in ours.columns:
            mean, std = ours[f"{metric}_mean"] * scale, ours[f"{metric}_std"] * scale
            n = ours[f"{metric}_n"]
            if scale == 100.0 and (ours[f"{metric}_mean"] > 1.0 + 1e-9).any():
                raise ValueError(f"{name}: {metric} above 1 in the summary; expected a fraction in [0, 1]")
        else:
            mean = std = pd.Series(math.nan, index=ours.index)
            n = pd.Series(0, index=ours.index)
        part = ours[[*spec.keys, *extra, "study", "cell_id"]].copy()
        part["metric"] = col
        part["ours_mean"], part["ours_std"], part["n"] = mean.values, std.values, n.values
        parts.append(part)
    ours_long = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if ours_long.empty:
        ours_long = pd.DataFrame(columns=[*spec.keys, *extra, "study", "cell_id", "metric",
                                          "ours_mean", "ours_std", "n"])
    if spec.grid_csv is None:  # no paper grid: our cells only
        long = ours_long.assign(paper=math.nan)
    else:
        long = paper.merge(ours_long, on=[*spec.keys, "metric"], how="outer")
    long["summary_metric"] = long["metric"].map(shown)  # also on paper-only rows
    long["diff"] = long["ours_mean"] - long["paper"]
    long["unit"] = spec.unit
    long["table"] = name
    long = long[["table", *spec.keys, *extra, "metric", "summary_metric", "unit", "ours_mean", "ours_std", "n",
                 "paper", "diff", "study", "cell_id"]]
    long = long.astype({"ours_mean": float, "ours_std": float, "paper": float, "diff": float})
    long["n"] = pd.to_numeric(long["n"]).astype("Int64")
    return _sort(long, [*spec.keys, "metric"])


def _fmt_paper(x: float, decimals: int) -> str:
    """Paper value with the table's decimals, or more where the paper printed more (e.g. 6.93)."""
    s = f"{x:.{decimals}f}"
    return s if math.isclose(float(s), x, rel_tol=0, abs_tol=1e-9) else f"{x:g}"


def format_cell(mean: float, std: float, n: Any, paper: float, decimals: int = 1) -> str:
    """``"91.00 ± 1.41 (n=2) [91.77]"``: ours (empty when not run), paper in brackets (when known)."""
    def ok(x: Any) -> bool:
        return x is not None and not pd.isna(x)
    out = ""
    if ok(mean):
        out = f"{mean:.{decimals}f}"
        if ok(std):
            out += f" ± {std:.{decimals}f}"
        out += f" (n={int(n)})" if ok(n) else ""
    if ok(paper):
        out = f"{out} [{_fmt_paper(paper, decimals)}]".strip()
    return out


def _fill_unique(s: pd.Series) -> pd.Series:
    vals = s.dropna().unique()
    return s.fillna(vals[0]) if len(vals) == 1 else s


def pivot(long: pd.DataFrame, name: str) -> pd.DataFrame:
    """Lay a :func:`build_table` frame out like the paper: rows as in the paper, one column per
    defense (and variant; per metric where the paper has two); cells from :func:`format_cell`.

    A row key that is one of our own settings (Table 5's ``c_sel``) is blank for cells we did not
    run; where that row holds a single value of ours it is shown on the whole row.
    """
    spec = SPECS[name]
    df = long.reset_index(drop=True)
    rows = [r for r in spec.rows if r in df.columns]
    for r in rows:
        if r in spec.extra_keys:
            other = [k for k in rows if k != r] or [pd.Series(0, index=df.index)]
            df[r] = df.groupby(other, dropna=False)[r].transform(_fill_unique)
    variant = (df["defense_variant"].fillna("default").astype(str) if "defense_variant" in df.columns
               else pd.Series("default", index=df.index))
    label = df["defense"].map(lambda d: display("defense", d))
    label = label.where(variant == "default", label + " (" + variant + ")")
    if len(spec.metrics) > 1:
        label = label + " " + df["metric"].map(lambda m: display("metric", m))
    df["column"] = label
    defense_order, metric_order = list(DEFENSE_NAMES), [m for m, _, _ in spec.metrics]
    df["_col_key"] = [(defense_order.index(d) if d in defense_order else len(defense_order), str(d),
                       v != "default", v, metric_order.index(m))
                      for d, v, m in zip(df["defense"], variant, df["metric"])]
    cols = list(dict.fromkeys(df.sort_values("_col_key", kind="stable")["column"]))
    df["cell"] = [format_cell(r.ours_mean, r.ours_std, r.n, r.paper, spec.decimals) for r in df.itertuples()]
    for r in rows:
        kind = r if r in ("dataset", "attack") else None
        df[r] = df[r].map(lambda v, k=kind: display(k, v) if k else ("" if pd.isna(v) else f"{v:g}"))
    clash = df.duplicated([*rows, "column"], keep=False)
    if clash.any():  # never let one cell hide another
        raise ValueError(f"{name}: several results for one table cell: "
                         f"{df.loc[clash, [*rows, 'column']].drop_duplicates().values.tolist()}")
    row_order = list(dict.fromkeys(map(tuple, df[rows].values.tolist())))  # long is in paper order
    wide = df.pivot_table(index=rows, columns="column", values="cell", aggfunc="first", sort=False)
    index = (pd.MultiIndex.from_tuples(row_order, names=rows) if len(rows) > 1
             else pd.Index([r[0] for r in row_order], name=rows[0]))
    wide = wide.reindex(index=index, columns=cols).fillna("").reset_index()
    wide.columns.name = None
    return wide.rename(columns={"attack": "Attack", "dataset": "Dataset"})


def _blank(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype(object).where(df.notna(), "")


def write_table(df: pd.DataFrame, prefix: str | os.PathLike[str], caption: str | None = None) -> list[Path]:
    """Write ``prefix.csv``, ``prefix.md`` (to_markdown) and ``prefix.tex`` (Styler.to_latex)
    atomically; NaN is written as an empty cell. Returns the three paths."""
    prefix = Path(prefix)
    md = _blank(df).to_markdown(index=False)
    if caption:
        md = f"{caption}\n\n{md}"
    sty = (_blank(df).style.hide(axis="index").format(escape="latex", precision=4)
           .format_index(escape="latex", axis=1))
    tex_caption = None if caption is None else "".join("\\" + ch if ch in "%&_#$" else ch for ch in caption)
    tex = sty.to_latex(caption=tex_caption, hrules=True, column_format="l" * len(df.columns))
    tex = tex.replace("±", r"$\pm$")
    return [
        atomic_write_text(prefix.with_name(prefix.name + ".csv"), df.to_csv(index=False)),
        atomic_write_text(prefix.with_name(prefix.name + ".md"), md + "\n"),
        atomic_write_text(prefix.with_name(prefix.name + ".tex"), tex),
    ]


def caption(name: str, asr: str = "rounds") -> str:
    """Table ``name``'s caption, with the definition of the ASR it shows (:data:`ASR_DEFINITIONS`)."""
    spec = SPECS[name]
    if asr not in ASR_DEFINITIONS:
        raise ValueError(f"unknown ASR definition asr={asr!r}; known: {', '.join(ASR_DEFINITIONS)}")
    has_asr = any(m == "asr" for _, m, _ in spec.metrics)
    return spec.caption + (" " + ASR_DEFINITIONS[asr][1] if has_asr else "")


def stand_in_note(long: pd.DataFrame) -> str:
    """A caption sentence for a table holding rows of a stand-in dataset (:data:`STAND_INS`), else ``""``."""
    ours = long.loc[long["ours_mean"].notna(), "dataset"] if "dataset" in long.columns else pd.Series([], dtype=object)
    used = [d for d in STAND_INS if d in set(ours)]
    if not used:
        return ""
    names = "; ".join(f"{display('dataset', d)}: {STAND_INS[d]}" for d in used)
    return (f" {names}, a dataset the paper does not use, so its rows have no paper value; the bracketed values "
            "in the other rows are the paper's own datasets, shown for the pattern across defenses, not for a "
            "direct comparison.")


def write_paper_table(summary: pd.DataFrame, name: str, out_dir: str | os.PathLike[str],
                      **kwargs: Any) -> list[Path]:
    """Build table ``name`` and write ``<name>.{csv,md,tex}`` (paper layout) and
    ``<name>_long.{csv,md,tex}`` (tidy) under ``out_dir``; ``kwargs`` go to :func:`build_table`."""
    long = build_table(summary, name, **kwargs)
    cap = caption(name, kwargs.get("asr", "rounds")) + stand_in_note(long)
    ours = " Ours: mean ± std over seeds (n)" + ("; paper value in brackets." if SPECS[name].paper_csv else ".")
    return [*write_table(pivot(long, name), Path(out_dir) / name, caption=cap + ours),
            *write_table(long, Path(out_dir) / f"{name}_long", caption=cap)]


def write_all_tables(summary: pd.DataFrame, out_dir: str | os.PathLike[str], **kwargs: Any) -> list[Path]:
    """:func:`write_paper_table` for every table in :data:`TABLES`."""
    return [p for name in TABLES for p in write_paper_table(summary, name, out_dir, **kwargs)]


__all__ = ["ASR_DEFINITIONS", "PAPER_DIR", "SPECS", "STAND_INS", "TABLES", "TableSpec", "build_table", "caption", "display",
           "format_cell", "load_paper", "pivot", "stand_in_note", "write_all_tables", "write_paper_table",
           "write_table"]
