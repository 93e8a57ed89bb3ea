"""Render bench/results/ into one Markdown file, bench/RESULTS.md (tables generated from the measurements only;
generated on demand, not kept in the repository).

    python bench/summarise.py [--results bench/results] [--out bench/RESULTS.md]

Each section renders the result files its glob patterns (:data:`SECTIONS`) match, by what they measure; a
result file no pattern matches is listed at the end (:func:`unrendered`), so a renamed or new kind of file
shows up instead of vanishing from the summary.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
RES = HERE / "results"

# ------------------------------------------------------------------------ which files each section renders
#: bench_engine.py's whole rounds (one run, packed runs, the sequential reference); A/B pairs in subfolders
ROUNDS = ("round_*.json", "*/round_*.json", "*/*/round_*.json", "vmap_packed_*.json", "vmap_torch_compile_*.json")
#: bench_engine.py --dirichlet
UNEQUAL = ("unequal_shards_*.json",)
#: bench_run.py: one run end to end
RUNS = ("run_*.json", "*/run_*.json")
#: bench_conv.py: training steps under each convolution path
STEPS = ("stacked_layouts_*.json", "vmap_conv_paths_*.json", "triton_conv_step_*.json", "conv_epilogues_*.json")
#: bench_triton_conv.py: convolution layers, cuDNN vs the Triton kernels and their tile sweeps
LAYERS = ("triton_conv_*.json", "triton_conv_*.jsonl", "*/sweep*.json")
LAYERS_EXCLUDE = ("triton_conv_step_*.json",)
#: bench_dense.py
DENSE = ("dense_*.json",)
#: profile_step.py
PROFILES = ("profile_*.json", "*/profile_*.json", "*/*/profile_*.json")
#: bench_attack.py
ATTACK_GRAPH = ("attack_graph_*.json",)
ATTACK_DIVERGENCE = ("attack_divergence_*.json",)
ATTACK_BOOSTING = ("attack_boosting_graph*.json",)
ATTACK_STACKED = ("attack_stacked_*.json",)
#: measurements recorded as named values, not rows
PROBES = ("attack_crafting_probe_*.json",)
#: bench_aggregators.py
AGGREGATORS = ("aggregators_*.json",)
#: bench_cells.py
CELLS = ("cells_*.json",)
#: estimate_grid.py
GRID = ("grid_estimate_*.json",)
#: accuracy checks: a study run through the pipeline, its seed-aggregated summary
STUDIES = ("*/summary.csv",)

FRAMEWORKS = ("flower_vs_robustfl_*.json",)
#: bench_diagnostics.py: the per-round attack diagnostics, per library checkout
DIAGNOSTICS = ("diagnostics_*.json",)


def _files(res: Path, patterns: Iterable[str], exclude: Iterable[str] = ()) -> list[Path]:
    """The files under ``res`` matching any of ``patterns`` and none of ``exclude`` (sorted, each once)."""
    out = {f for p in patterns for f in res.glob(p) if f.is_file()}
    out -= {f for p in exclude for f in res.glob(p)}
    return sorted(out)


def _meta(d: dict) -> str:
    v = d.get("versions") or {}
    dev = d.get("device") or sorted({r.get("device", "?") for r in d.get("results", [])})
    return (f"device: {dev}; torch {v.get('torch')}, python {v.get('python')}; date {d.get('date')}; "
            f"commit {d.get('git_commit')}")


def _table_sections(res: Path, title: str, patterns: Iterable[str], cols: list[str],
                    notes: tuple[str, ...] = (), *, settings: tuple[str, ...] = (),
                    file_note: bool = False) -> list[str]:
    """One subsection per result file matching ``patterns``: its metadata (with the top-level ``settings``
    it records, and its own ``note`` where ``file_note``) and the columns ``cols`` it has."""
    out = [title, ""]
    for f in _files(res, patterns):
        d = json.loads(f.read_text())
        df = pd.DataFrame(d["results"])
        meta = _meta(d) + "".join(f"; {k} {d.get(k)}" for k in settings)
        out += [f"### `{f.relative_to(res)}`", "", meta, "", *((d.get("note", ""), "") if file_note else ()),
                df[[c for c in cols if c in df]].to_markdown(index=False, floatfmt=".4g"), "", *notes]
    return out


def engine_section(res: Path) -> list[str]:
    cols = ["model", "n_clients", "samples_per_client", "batch", "epochs", "precision", "compiled", "conv", "cuda_graph",
            "train_flops_per_round", "vectorised_s_per_round", "vectorised_tflops", "sequential_s_per_round",
            "speedup_vectorised_over_sequential", "vectorised_s_per_later_round", "speedup_later_round_over_sequential",
            "packed_cells", "packed_s_per_cell_round", "packed_tflops", "vectorised_peak_mem_gib", "packed_peak_mem_gib"]
    return _table_sections(res, "## Local training, whole rounds (`bench_engine.py`; paper settings, random inputs of "
                           "the right shape; a folder holds an A/B pair measured on one machine)", ROUNDS, cols)


def unequal_section(res: Path) -> list[str]:
    return _table_sections(
        res, "## Unequal shards (`bench_engine.py --dirichlet`): skipping idle clients vs masked batches", UNEQUAL,
        ["model", "n_clients", "samples", "dirichlet_alpha", "batch", "epochs", "conv", "cuda_graph", "fill",
         "skip_idle_s_per_round", "masked_s_per_round", "speedup_skip_idle"],
        ("`fill`: real client-steps / lock-step client-steps (the share of work the masked path does not waste).", ""))


def run_section(res: Path) -> list[str]:
    out = _table_sections(
        res, "## One paper run end to end (`bench_run.py`: `run_cell`, data load to final metrics, 20 rounds)", RUNS,
        ["variant", "precision", "engine_conv", "engine_cuda_graph", "end_to_end_s", "sim_wall_s", "train_s_total",
         "attack_s_total", "agg_s_total", "peak_gpu_mem_gib", "test_acc"],
        ("Random uint8 data of the dataset's shape and size (`data: random` in the file), so accuracy is chance.", ""))
    for f in _files(res, RUNS):  # the one-time steps before run_cell, for the record
        d = json.loads(f.read_text())
        out.append(f"- `{f.relative_to(res)}`: data {d.get('data')}; decoding the dataset into the prepared cache "
                   f"{d.get('prepare_s', float('nan')):.1f} s and partitioning {d.get('partition_s', float('nan')):.1f} s, "
                   "once per dataset and seed, before and outside `end_to_end_s`")
    return out + [""]


def steps_section(res: Path) -> list[str]:
    out = ["## Training steps under each convolution path (`bench_conv.py`; seconds per step of all clients)", ""]
    for f in _files(res, STEPS):
        d = json.loads(f.read_text())
        out += [f"### `{f.relative_to(res)}`", "", _meta(d) + f"; {d.get('steps_timed')} timed steps per client", ""]
        df = pd.DataFrame(d["results"])
        if "error" in df:
            df["s_per_step"] = df["s_per_step"].where(df["error"].isna(), float("nan"))
        piv = df.pivot_table(index=["model", "n_clients"], columns="variant", values="s_per_step", sort=False)
        out += ["Seconds per step (NaN: out of memory):", "", piv.to_markdown(floatfmt=".4g"), ""]
        piv = df.pivot_table(index=["model", "n_clients"], columns="variant", values="tflops", sort=False)
        out += ["Achieved TFLOP/s:", "", piv.to_markdown(floatfmt=".3g"), ""]
    return out


def layers_section(res: Path) -> list[str]:
    """Per-layer times of cuDNN vs the Triton kernels, and each Triton kernel's fastest tile shape
    (``bench_triton_conv.py``; a ``.jsonl`` file holds the rows one per line, its first line the metadata)."""
    out = ["## Convolution layers: cuDNN vs Triton kernels (`bench_triton_conv.py`; ms, median of do_bench)", ""]
    for f in _files(res, LAYERS, LAYERS_EXCLUDE):
        if f.suffix == ".jsonl":
            lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            head, rows = (lines[0], lines[1:]) if lines and "ms" not in lines[0] else ({}, lines)
            meta = _meta(head) + (f"; {head['note']}" if "note" in head else "")
        else:
            d = json.loads(f.read_text())
            rows, meta = d["results"], _meta(d)
        df = pd.DataFrame(rows)
        if "ms" not in df:
            continue
        df = df.dropna(subset=["ms"])
        if "tflops" not in df and "flops" in df:
            df["tflops"] = df["flops"] / df["ms"] / 1e9
        whole = df[df.kernel_pass == "fwd+bwd"]
        parts = df[df.kernel_pass != "fwd+bwd"].sort_values("ms").groupby(["model", "layer", "kernel_pass"]).head(1)
        out += [f"### `{f.relative_to(res)}`", "", meta, ""]
        if not whole.empty:
            piv = whole.pivot_table(index=["model", "layer", "cin", "cout", "h", "kernel"], columns="path", values="ms")
            out += ["Forward + backward of one layer:", "", piv.reset_index().to_markdown(index=False, floatfmt=".4g"),
                    ""]
        if not parts.empty:
            cols = [c for c in ("model", "layer", "kernel_pass", "tiles", "path", "ms", "tflops") if c in parts]
            out += ["Fastest tile shape per kernel:", "", parts[cols].to_markdown(index=False, floatfmt=".4g"), ""]
    return out


def dense_section(res: Path) -> list[str]:
    cols = ["model", "clients", "batch", "k", "n", "precision", "product", "path", "splits", "ms", "tflops", "max_rel_err",
            "max_rel_err_vs_fp64", "error"]
    return _table_sections(res, "## Dense layers' products: cuBLAS vs the split-K kernel (`bench_dense.py`; ms, median "
                           "of do_bench; `--products`: forward, dX and dW, the kernel in FP32 FMAs, tf32x3 and TF32, "
                           "error against float64 relative to the largest entry)", DENSE, cols)


def profile_section(res: Path) -> list[str]:
    out = ["## Where a training step's GPU time goes (`profile_step.py`; eager, ms per step, largest kernels)", ""]
    for f in _files(res, PROFILES):
        d = json.loads(f.read_text())
        df = pd.DataFrame(d["results"])
        df["kernel"] = df["kernel"].str.slice(0, 90)
        out += [f"### `{f.relative_to(res)}`", "", _meta(d) + f"; {d['model']}, conv {d['conv']}, {d['precision']}, "
                f"{d['clients']} clients, batch {d['batch']}; all kernels {d['kernels_ms_per_step']:.3f} ms per step", "",
                df[["ms_per_step", "calls", "kernel"]].head(10).to_markdown(index=False, floatfmt=".4g"), ""]
    return out


def attack_section(res: Path) -> list[str]:
    return (_table_sections(
        res, "## Attackers' crafting (`bench_attack.py`: alternating minimisation, eager vs CUDA graph, one process)",
        ATTACK_GRAPH, ["model", "shard", "batch", "backdoor_set", "benign_epochs", "iterations", "eager_s", "graph_s",
                       "speedup", "rel_diff_graph_vs_eager"])
        + _table_sections(res, "### Run-to-run divergence of the crafted update (relative L2)", ATTACK_DIVERGENCE,
                          ["iterations", "eager_vs_eager", "graph_vs_graph", "graph_vs_eager", "norm_eager",
                           "norm_graph", "backdoor_loss_eager", "backdoor_loss_graph"],
                          ("Two eager runs diverge as much as graph vs eager after 314 boosted iterations: "
                           "GPU float noise amplified by boost 10, not a difference between the two paths.", ""))
        + _table_sections(res, "### Attack-Coomed-Backdoor's boosting to convergence (`bench_attack.py --attack "
                          "boosting`; `tol` -1: every run takes `max_steps` steps)", ATTACK_BOOSTING,
                          ["model", "backdoor_set", "max_steps", "tol", "steps_eager", "steps_graph", "eager_s",
                           "graph_s", "speedup", "rel_diff_graph_vs_eager"])
        + _table_sections(res, "### Single-model crafting vs all attackers at once on the stacked engine "
                          "(`bench_attack.py --attackers`, one process)", ATTACK_STACKED,
                          ["model", "dropout", "attack", "attackers", "layout", "shard", "batch", "single_s",
                           "stacked_s", "speedup", "rel_diff_stacked_vs_single"],
                          ("The relative difference is the crafting's own sensitivity to rounding (TF32 kernels; "
                           "`attack_crafting_probe_h100.json`), not a difference between the two computations, which "
                           "agree in FP32 (tests/test_attacks_vectorised.py).", "")))


def probes_section(res: Path) -> list[str]:
    """Files that record named values rather than rows: each rendered as its JSON, versions left out."""
    out = ["## Probes (named measurements)", ""]
    for f in _files(res, PROBES):
        d = json.loads(f.read_text())
        body = {k: v for k, v in d.items() if k not in ("versions", "device", "date", "git_commit")}
        out += [f"### `{f.relative_to(res)}`", "", _meta(d), "", "```json", json.dumps(body, indent=1), "```", ""]
    return out


def agg_section(res: Path) -> list[str]:
    out = ["## Aggregation time (fmnist model, d = 3,382,346; median of repeats; seconds)", ""]
    for f in _files(res, AGGREGATORS):
        d = json.loads(f.read_text())
        out += [f"### `{f.relative_to(res)}`", "", _meta(d), ""]
        df = pd.DataFrame([r for r in d["results"] if "seconds" in r])
        if df.empty:
            continue
        df["col"] = df["impl"] + ":" + df["rule"]
        piv = df.pivot_table(index="n", columns="col", values="seconds")
        out += [piv.to_markdown(floatfmt=".4g"), ""]
        if "max_abs_diff_vs_robustfl" in df:
            diffs = df[df["max_abs_diff_vs_robustfl"].notna()]
            piv = diffs.pivot_table(index="n", columns="col", values="max_abs_diff_vs_robustfl")
            out += ["Largest absolute difference of each peer's aggregate from ours (same inputs):", "",
                    piv.to_markdown(floatfmt=".2g"), ""]
        for r in (r for r in d["results"] if "error" in r):
            out.append(f"- {r['impl']}:{r['rule']} n={r['n']}: {r['error']}")
    return out


def cells_section(res: Path) -> list[str]:
    return _table_sections(
        res, "## Per-round cost of each attack and defense besides training (`bench_cells.py`; one run alone on a GPU, "
        "rounds after the first; random inputs of each dataset's shape)", CELLS,
        ["dataset", "attack", "backdoor", "n_clients", "n_attackers", "defense", "rounds", "train_s_median",
         "attack_s_median", "agg_s_median", "other_s_per_round", "end_to_end_s"])


def grid_section(res: Path) -> list[str]:
    out = ["## Whole-grid estimate (`estimate_grid.py`, from measured per-cell times)", ""]
    for f in _files(res, GRID):
        d = json.loads(f.read_text())
        out += [f"### `{f.relative_to(res)}`", "", f"device {d['device']}; date {d['date']}; commit {d['git_commit']}; "
                f"cells {d['cells_file']}; engine times {d['engine_file']}", "",
                f"- runs: {d['runs']}; estimated GPU-hours: **{d['gpu_hours']:.2f}** "
                f"(local training alone {d['gpu_hours_training_only']:.2f}, attackers' crafting "
                f"{d.get('gpu_hours_attack_crafting', float('nan')):.2f}); "
                + (f"crafting, aggregation and other time from {', '.join(d['costs_files'])}" if d.get("costs_files")
                   else f"crafting speed-ups from {d.get('attack_bench_file')}"),
                "- by dataset: " + ", ".join(f"{k} {v:.2f} h" for k, v in d["gpu_hours_by_dataset"].items()),
                "- inputs: " + json.dumps(d["inputs"]), ""]
    return out


def studies_section(res: Path) -> list[str]:
    """Accuracy checks run through the pipeline: each study folder's ``summary.csv``, final test accuracy."""
    out = ["## Accuracy checks (a study run through the pipeline; final test accuracy over seeds)", ""]
    for f in _files(res, STUDIES):
        df = pd.read_csv(f)
        cols = [c for c in ("cell_id", "test_acc_mean", "test_acc_std", "test_acc_n", "devices") if c in df]
        out += [f"### `{f.parent.relative_to(res)}/`", "", df[cols].to_markdown(index=False, floatfmt=".4g"), ""]
    return out


def frameworks_section(res: Path) -> list[str]:
    """The same FedAvg run through another framework and through robustfl (``bench_flower.py``)."""
    return _table_sections(res, "## Against other frameworks (the same FedAvg run; seconds)", FRAMEWORKS,
                           ["impl", "engine", "end_to_end_s", "per_round_s", "test_acc"], file_note=True)


def diagnostics_section(res: Path) -> list[str]:
    """The per-round attack diagnostics (``bench_diagnostics.py``), one row per library checkout timed."""
    return _table_sections(res, "## Per-round attack diagnostics (seconds per round)", DIAGNOSTICS,
                           ["library_commit", "median_s", "krum_rank"], settings=("n", "d"), file_note=True)


#: the sections in the order RESULTS.md shows them, each with the patterns of the files it renders
SECTIONS: list[tuple[Callable[[Path], list[str]], tuple[str, ...]]] = [
    (run_section, RUNS), (engine_section, ROUNDS), (unequal_section, UNEQUAL), (steps_section, STEPS),
    (layers_section, LAYERS), (dense_section, DENSE), (profile_section, PROFILES),
    (attack_section, ATTACK_GRAPH + ATTACK_DIVERGENCE + ATTACK_BOOSTING + ATTACK_STACKED), (probes_section, PROBES),
    (agg_section, AGGREGATORS), (cells_section, CELLS), (grid_section, GRID), (studies_section, STUDIES),
    (frameworks_section, FRAMEWORKS), (diagnostics_section, DIAGNOSTICS),
]


def unrendered(res: Path = RES) -> list[Path]:
    """Result files (``.json``, ``.jsonl``, outside a study's ``runs/``) that no section renders."""
    every = {f for ext in ("*.json", "*.jsonl") for f in res.rglob(ext) if "runs" not in f.relative_to(res).parts}
    covered = {f for _, patterns in SECTIONS for f in _files(res, patterns)}
    return sorted(every - covered)


def render(res: Path = RES) -> str:
    lines = ["# Benchmark results", "",
             f"Generated by `bench/summarise.py` from `{res.name}/`; every number below was measured by a script of",
             "`bench/` (named in each section), or computed from such measurements by `bench/estimate_grid.py`.",
             "Device, versions, date and commit of each file: `results/index.csv` and each file's own header.", ""]
    for section, _ in SECTIONS:
        lines += section(res)
    missing = unrendered(res)
    if missing:
        lines += ["## Files no section renders", ""] + [f"- `{f.relative_to(res)}`" for f in missing] + [""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RES)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    a = ap.parse_args()
    a.out.write_text(render(a.results))


if __name__ == "__main__":
    main()
