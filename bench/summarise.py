"""Render bench/results/*.json into bench/RESULTS.md (tables generated from the measurements only).

    python bench/summarise.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

HERE = Path(__file__).parent
RES = HERE / "results"


def _meta(d: dict) -> str:
    v = d.get("versions", {})
    dev = d.get("device") or sorted({r.get("device", "?") for r in d.get("results", [])})
    return (f"device: {dev}; torch {v.get('torch')}, python {v.get('python')}; date {d.get('date')}; "
            f"commit {d.get('git_commit')}")


def _table_sections(title: str, pattern: str, cols: list[str], notes: tuple[str, ...] = ()) -> list[str]:
    """One subsection per ``results/<pattern>`` file: its metadata and the columns ``cols`` it has."""
    out = [title, ""]
    for f in sorted(RES.glob(pattern)):
        d = json.loads(f.read_text())
        df = pd.DataFrame(d["results"])
        out += [f"### `{f.relative_to(RES)}`", "", _meta(d), "",
                df[[c for c in cols if c in df]].to_markdown(index=False, floatfmt=".4g"), "", *notes]
    return out


def engine_section() -> list[str]:
    cols = ["model", "n_clients", "samples_per_client", "batch", "epochs", "precision", "compiled", "conv", "cuda_graph",
            "train_flops_per_round", "vectorised_s_per_round", "vectorised_tflops", "sequential_s_per_round",
            "speedup_vectorised_over_sequential", "vectorised_s_per_later_round", "speedup_later_round_over_sequential",
            "packed_cells", "packed_s_per_cell_round", "packed_tflops", "vectorised_peak_mem_gib", "packed_peak_mem_gib"]
    return (_table_sections("## Local training engine, whole rounds (`bench_engine.py`; paper settings, random "
                            "inputs of the right shape)", "round_*.json", cols)
            + _table_sections("### Session 11 (H100): fmnist, CIFAR-10 and Kather rounds, each kernel set in its own "
                              "process within one device call, a fresh machine per call (S56: "
                              "`round_fmnist_s11a_h100/`; S57: `round_fmnist_s11b_h100/`, `round_s11c_h100/`; S58, "
                              "reverted: `kblock_s11_h100/`; S59: `dgrad_s11_h100/`, `final_s11_h100/`)",
                              "*s11*_h100/round_*.json", cols)
            + _table_sections("### Session 10 (H100): fmnist rounds against the sequential reference in fp32 and in bf16 "
                              "(both sides in the same precision), 9 cells packed, one process each "
                              "(`round_fmnist_s10_h100/`); the same command without `--conv auto`, i.e. vmap's "
                              "cuDNN path, on the same machine (`round_fmnist_vmap_s10_h100/`); the separable gather (S55, "
                              "`default`) against session 9's (`nosep`), one process each on another H100 "
                              "(`round_fmnist_sep_s10_h100/`)",
                              "round_fmnist*_s10_h100/*.json", cols)
            + _table_sections("### Session 9 (H100): fmnist rounds against the sequential reference, several processes "
                              "(`round_fmnist_s9_h100/`, `round_fmnist_s9i_h100/`, `round_fmnist_s9j_h100/`)",
                              "round_fmnist_s9*_h100/*.json", cols)
            + _table_sections("### Packed fmnist rounds, session 9 (`default`) vs session 8's kernels (`s8`), processes "
                              "alternating on one H100 (`round_packed_s9_h100/`: plans outside the timing; "
                              "`round_packed_s9i_h100/`: the cells' plans drawn inside it)", "round_packed_s9*_h100/*.json", cols)
            + _table_sections("### Packed rounds, session 8's kernels (`default`) vs session 7's (`s7`), processes "
                              "alternating on one H100 (`round_packed_s8_h100/`)", "round_packed_s8_h100/*.json", cols)
            + _table_sections("### Packed rounds, session 7's kernels (`default`) vs session 6's (`s6`), processes "
                              "alternating on one H100 (`round_packed_s7_h100/`)", "round_packed_s7_h100/*.json", cols)
            + _table_sections("### Earlier whole-round runs (vmap engine only)", "engine_*.json", cols))


def dense_section() -> list[str]:
    cols = ["model", "clients", "batch", "k", "n", "precision", "product", "path", "splits", "ms", "tflops", "max_rel_err",
            "max_rel_err_vs_fp64", "error"]
    return _table_sections("## Dense layers' products: cuBLAS vs the split-K kernel (`bench_dense.py`; ms, median of "
                           "do_bench; `--products`: forward, dX and dW, the kernel in FP32 FMAs, tf32x3 and TF32, "
                           "error against float64 relative to the largest entry)", "dense_*.json", cols)


def conv_section() -> list[str]:
    out = ["## Convolution path and GPU flags (`bench_conv.py`; seconds per training step of all clients)", ""]
    for f in sorted(RES.glob("kern_*.json")) + sorted(RES.glob("conv_*.json")):
        d = json.loads(f.read_text())
        out += [f"### `{f.name}`", "", _meta(d) + f"; {d.get('steps_timed')} timed steps per client", ""]
        df = pd.DataFrame(d["results"])
        if "error" in df:
            df["s_per_step"] = df["s_per_step"].where(df["error"].isna(), float("nan"))
        piv = df.pivot_table(index=["model", "n_clients"], columns="variant", values="s_per_step", sort=False)
        out += ["Seconds per step (NaN: out of memory):", "", piv.to_markdown(floatfmt=".4g"), ""]
        piv = df.pivot_table(index=["model", "n_clients"], columns="variant", values="tflops", sort=False)
        out += ["Achieved TFLOP/s:", "", piv.to_markdown(floatfmt=".3g"), ""]
    return out


def agg_section() -> list[str]:
    out = ["## Aggregation time (fmnist model, d = 3,382,346; median of repeats; seconds)", ""]
    for f in sorted(RES.glob("aggregators_*.json")):
        d = json.loads(f.read_text())
        out += [f"### `{f.name}`", "", _meta(d), ""]
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
        errs = [r for r in d["results"] if "error" in r]
        for r in errs:
            out.append(f"- {r['impl']}:{r['rule']} n={r['n']}: {r['error']}")
    return out


def unequal_section() -> list[str]:
    return _table_sections(
        "## Unequal shards (`bench_engine.py --dirichlet`): skipping idle clients vs masked batches",
        "unequal_shards_*.json",
        ["model", "n_clients", "samples", "dirichlet_alpha", "batch", "epochs", "conv", "cuda_graph", "fill",
         "skip_idle_s_per_round",
         "masked_s_per_round", "speedup_skip_idle"],
        ("`fill`: real client-steps / lock-step client-steps (the share of work the masked path does not waste).", ""))


def run_section() -> list[str]:
    out = _table_sections(
        "## One paper run end to end (`bench_run.py`: `run_cell`, data load to final metrics, 20 rounds)", "run_*.json",
        ["variant", "precision", "engine_conv", "engine_cuda_graph", "end_to_end_s", "sim_wall_s", "train_s_total",
         "attack_s_total", "agg_s_total", "peak_gpu_mem_gib", "test_acc"],
        ("Random uint8 data of the dataset's shape and size (`data: random` in the file), so accuracy is chance.", ""))
    out += _table_sections("### Session 11 (H100): one fmnist run after S56 (`round_fmnist_s11a_h100/`, with session 10's "
                           "kernels as `triton+graph+s10`), S57 (`round_s11c_h100/`) and S58's revert (`dgrad_s11_h100/`)",
                           "*s11*_h100/run_*.json", ["variant", "precision", "end_to_end_s", "sim_wall_s", "train_s_total",
                                                     "peak_gpu_mem_gib"])
    for f in sorted(RES.glob("run_*.json")):  # the one-time steps before run_cell, for the record
        d = json.loads(f.read_text())
        out.append(f"- `{f.name}`: data {d.get('data')}; decoding the dataset into the prepared cache "
                   f"{d.get('prepare_s', float('nan')):.1f} s and partitioning {d.get('partition_s', float('nan')):.1f} s, "
                   "once per dataset and seed, before and outside `end_to_end_s`")
    return out + [""]


def attack_section() -> list[str]:
    return (_table_sections(
        "## Attackers' crafting (`bench_attack.py`: alternating minimisation, eager vs CUDA graph, one process)",
        "attack_h100.json", ["model", "shard", "batch", "backdoor_set", "benign_epochs", "iterations", "eager_s",
                             "graph_s", "speedup", "rel_diff_graph_vs_eager"])
        + _table_sections("### Run-to-run divergence of the crafted update (relative L2)", "attack_divergence_*.json",
                          ["iterations", "eager_vs_eager", "graph_vs_graph", "graph_vs_eager", "norm_eager",
                           "norm_graph", "backdoor_loss_eager", "backdoor_loss_graph"],
                          ("Two eager runs diverge as much as graph vs eager after 314 boosted iterations: "
                           "GPU float noise amplified by boost 10, not a difference between the two paths.", ""))
        + _table_sections("### Attack-Coomed-Backdoor's boosting to convergence (`bench_attack.py --attack boosting`; "
                          "`tol` -1: every run takes `max_steps` steps)", "attack_boosting*.json",
                          ["model", "backdoor_set", "max_steps", "tol", "steps_eager", "steps_graph", "eager_s",
                           "graph_s", "speedup", "rel_diff_graph_vs_eager"])
        + _table_sections("### Single-model crafting vs all attackers at once on the stacked engine "
                          "(`bench_attack.py --attackers`, one process)", "attack_stacked_*.json",
                          ["model", "dropout", "attack", "attackers", "layout", "shard", "batch", "single_s",
                           "stacked_s", "speedup", "rel_diff_stacked_vs_single"],
                          ("The relative difference is the crafting's own sensitivity to rounding (TF32 kernels; "
                           "`attack_probe_s9b_h100.json`), not a difference between the two computations, which "
                           "agree in FP32 (tests/test_attacks_vectorised.py).", "")))


def cells_section() -> list[str]:
    return _table_sections(
        "## Per-round cost of each attack and defense besides training (`bench_cells.py`; one run alone on a GPU, "
        "rounds after the first; random inputs of each dataset's shape)", "cells_*.json",
        ["dataset", "attack", "backdoor", "n_clients", "n_attackers", "defense", "rounds", "train_s_median",
         "attack_s_median",
         "agg_s_median", "other_s_per_round", "end_to_end_s"])


def grid_section() -> list[str]:
    out = ["## Whole-grid estimate (`estimate_grid.py`, from measured per-cell times)", ""]
    for f in sorted(RES.glob("grid_estimate_*.json")):
        d = json.loads(f.read_text())
        out += [f"### `{f.name}`", "", f"device {d['device']}; date {d['date']}; commit {d['git_commit']}; "
                f"cells {d['cells_file']}; engine times {d['engine_file']}", "",
                f"- runs: {d['runs']}; estimated GPU-hours: **{d['gpu_hours']:.2f}** "
                f"(local training alone {d['gpu_hours_training_only']:.2f}, attackers' crafting "
                f"{d.get('gpu_hours_attack_crafting', float('nan')):.2f}); "
                + (f"crafting, aggregation and other time from {', '.join(d['costs_files'])}" if d.get("costs_files")
                   else f"crafting speed-ups from {d.get('attack_bench_file')}"),
                "- by dataset: " + ", ".join(f"{k} {v:.2f} h" for k, v in d["gpu_hours_by_dataset"].items()),
                "- inputs: " + json.dumps(d["inputs"]), ""]
    return out


def triton_section() -> list[str]:
    """Per-layer times of cuDNN vs the Triton kernels, and each Triton kernel's fastest tile shape
    (``bench_triton_conv.py``: ``triton_conv*.json``, or the JSON lines of a run whose file was lost)."""
    out = ["## Convolution layers: cuDNN vs Triton kernels (`bench_triton_conv.py`; ms, median of do_bench)", ""]
    files = (sorted(RES.glob("triton_conv*.json")) + sorted(RES.glob("triton_conv*.jsonl"))
             + sorted(RES.glob("wgrad_sweep_*.json")) + sorted(RES.glob("*_s11_h100/sweep_*.json")))
    for f in files:
        if f.suffix == ".jsonl":
            rows, meta = [json.loads(line) for line in f.read_text().splitlines() if line.strip()], (
                "JSON lines printed by the script (the result file with its header did not come back from the "
                "device; H100, see bench/README.md)")
        else:
            d = json.loads(f.read_text())
            rows, meta = d["results"], _meta(d)
        df = pd.DataFrame(rows)
        if "ms" not in df:
            continue
        df = df.dropna(subset=["ms"])
        whole = df[df.kernel_pass == "fwd+bwd"].pivot_table(index=["model", "layer", "cin", "cout", "h", "kernel"],
                                                            columns="path", values="ms")
        parts = df[df.kernel_pass != "fwd+bwd"].sort_values("ms").groupby(["model", "layer", "kernel_pass"]).head(1)
        out += [f"### `{f.relative_to(RES)}`", "", meta, "", "Forward + backward of one layer (10 clients):", "",
                whole.reset_index().to_markdown(index=False, floatfmt=".4g"), "", "Fastest tile shape per kernel:", "",
                parts[["model", "layer", "kernel_pass", "tiles", "ms", "tflops"]].to_markdown(index=False, floatfmt=".4g"),
                ""]
    return out


def profile_section() -> list[str]:
    out = ["## Where a training step's GPU time goes (`profile_step.py`; eager, ms per step, largest kernels)", ""]
    for f in sorted(RES.glob("profile_*.json")) + sorted(RES.glob("*s11*_h100/profile_*.json")):
        d = json.loads(f.read_text())
        df = pd.DataFrame(d["results"])
        df["kernel"] = df["kernel"].str.slice(0, 90)
        out += [f"### `{f.relative_to(RES)}`" + (f" (kernels `{d['kernels']}`)" if "kernels" in d else ""), "", _meta(d) + f"; {d['model']}, conv {d['conv']}, {d['precision']}, "
                f"{d['clients']} clients, batch {d['batch']}; all kernels {d['kernels_ms_per_step']:.3f} ms per step", "",
                df[["ms_per_step", "calls", "kernel"]].head(10).to_markdown(index=False, floatfmt=".4g"), ""]
    return out


def main() -> None:
    lines = ["# Benchmark results", "", "Generated by `bench/summarise.py` from `bench/results/*.json`; every number below",
             "was measured by `bench/bench_run.py`, `bench/bench_engine.py`, `bench/bench_conv.py`,",
             "`bench/bench_triton_conv.py`, `bench/bench_dense.py`, `bench/profile_step.py`, `bench/bench_attack.py`, `bench/bench_cells.py` or",
             "`bench/bench_aggregators.py`, or computed from such measurements by `bench/estimate_grid.py` (see those files).", ""]
    lines += (run_section() + engine_section() + conv_section() + triton_section() + dense_section() + profile_section()
              + attack_section() + agg_section() + unequal_section() + cells_section() + grid_section())
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
