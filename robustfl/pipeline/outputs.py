"""What a study builds: its runs' directories, the outputs a grid block's cells feed (``outputs:`` of the
config, the schema's ``output_name``) and the files ``rule all`` asks for."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robustfl.pipeline.study import Cell

#: The paper's tables (robustfl.reporting.tables), one rule each, and their report titles.
TABLE_TITLES = {
    "table2": "Table 2: accuracy, no attack",
    "table3": "Table 3: semantic backdoor attacks",
    "table3_multiple": "Table 3 (20 targeted inputs): semantic backdoor attacks",
    "table3_trojan": "Table 3 (trojan): trojan backdoor attacks",
    "table4": "Table 4: untargeted attacks",
    "table5": "Table 5: non-i.i.d. backdoor ASR",
    "aux_ablation": "FLARE's auxiliary class (ablation)",
}
TABLES = tuple(TABLE_TITLES)
DATASET_FIGURES = ("fig_confidence", "fig12", "fig13")  # one figure per dataset
SNAPSHOT_FIGURES = ("fig_plr", "fig_mmd", "fig4")  # one figure per designated cell (first seed)
CELL_FIGURES = ("fig_attack",)  # one figure per tagged cell, from the runs of all its seeds
OTHER_OUTPUTS = ("cost", "attack_sweep", "report_card")  # tables (and figures) of their own
OUTPUTS = (*TABLES, *DATASET_FIGURES, *SNAPSHOT_FIGURES, *CELL_FIGURES, *OTHER_OUTPUTS)


def run_dir(results: str, cell_id: str, seed: int) -> str:
    """A run's directory: named by its cell's id (every non-default field) and seed."""
    return f"{results}/runs/{cell_id}/seed{seed}"


def run_done(results: str, cell_id: str, seed: int) -> bool:
    """A run is done when its run.json exists: robustfl writes it last, atomically."""
    return (Path(run_dir(results, cell_id, seed)) / "run.json").exists()


def tagged(cells: Iterable[Cell], output: str) -> list[Cell]:
    """The cells feeding ``output``, by id."""
    return sorted((c for c in cells if output in c.outputs), key=lambda c: c.id)


def table_files(reports: str, study: str, table: str) -> list[str]:
    """A table's files: paper layout and long (tidy), each as csv, md and tex."""
    return [f"{reports}/{study}/tables/{table}{suffix}.{ext}"
            for suffix in ("", "_long") for ext in ("csv", "md", "tex")]


def study_targets(cells: Iterable[Cell], study: str, results: str, reports: str) -> list[str]:
    """Everything ``rule all`` builds for a study of these cells: its aggregates and cell list, and each
    table and figure that at least one cell feeds."""
    cells = list(cells)
    targets = [
        f"{results}/studies/{study}/all_rounds.csv",
        f"{results}/studies/{study}/all_clients.csv",
        f"{results}/studies/{study}/summary.csv",
        f"{reports}/{study}/cells.csv",
    ]
    for table in TABLES:
        if tagged(cells, table):
            targets += table_files(reports, study, table)
    for fig in DATASET_FIGURES:
        for ds in sorted({c.dataset for c in tagged(cells, fig)}):
            targets.append(f"{reports}/{study}/figures/{fig}_{ds}.png")
    for fig in (*SNAPSHOT_FIGURES, *CELL_FIGURES):
        for c in tagged(cells, fig):
            targets.append(f"{reports}/{study}/figures/{fig}/{c.id}.png")
    if tagged(cells, "cost"):
        targets += [f"{reports}/{study}/tables/cost.csv", f"{reports}/{study}/figures/cost.png"]
    if tagged(cells, "attack_sweep"):
        targets += [f"{reports}/{study}/tables/attack_sweep.csv", f"{reports}/{study}/tables/attack_sweep.md"]
    card = tagged(cells, "report_card")
    if card:
        targets += card_files(reports, study, sorted({c.cfg["defense"] for c in card}))
    return targets


def card_files(reports: str, study: str, defenses: Iterable[str]) -> list[str]:
    """A report card's files: the tidy frames, each defense's table (csv, md, tex) and heatmap, the ranking."""
    out = f"{reports}/{study}/report_card"
    files = [f"{out}/card_runs.csv", f"{out}/card_summary.csv", f"{out}/ranking.png"]
    for d in defenses:
        files += [f"{out}/card_{d}.{ext}" for ext in ("csv", "md", "tex")] + [f"{out}/heatmap_{d}.png"]
    return files
