# Stage 3: the runs. The output directory of a run is named by the cell id (every non-default RunConfig
# field) and the seed, so changing a cell's parameters creates a new directory and reruns that cell only.
# The whole directory is the output: an interrupted job leaves nothing Snakemake trusts (it deletes the
# directory; --rerun-incomplete reruns it), while the library's resume checkpoint lives next to it
# (runs/<cell>/.seed<N>.ckpt.pt) and survives to resume the rerun.
#
# pack: 1 (default) -- rule run_cell, one job per cell x seed (robustfl.fl.experiment.run_cell).
# pack: N > 1       -- GPU batch mode: one rule per pack of up to N runs not done yet
#                      (robustfl.pipeline.packs.plan_packs), each one process training its runs' clients together
#                      (robustfl.fl.experiment.run_cells). Runs already done are inputs, not outputs.

if PACK <= 1:

    rule run_cell:
        input:
            data=lambda w: f"{DATA_DIR}/{cell_dataset(w.cell)}",
            partition=lambda w: partition_path(w.cell, w.seed, "npz"),
            manifest=lambda w: partition_path(w.cell, w.seed, "json"),
        output:
            directory(f"{RESULTS}/runs/{{cell}}/seed{{seed}}"),
        params:
            cfg=lambda w: cell_params(w.cell),
        log:
            f"{RESULTS}/logs/run/{{cell}}/seed{{seed}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/run/{{cell}}/seed{{seed}}.tsv"
        threads: res("run", "threads", 2)
        resources:
            mem_mb=res("run", "mem_mb", 8000),
            runtime=res("run", "runtime", 240),
            gpu=lambda w: run_gpus(),
        conda:
            "../envs/robustfl.yaml"
        script:
            "../scripts/run_cell.py"

else:

    PACKS = packs.plan_packs(study_cells(STUDY), PACK, RESULTS)

    for _pack in PACKS:

        rule:
            name:
                _pack.name
            input:
                data=f"{DATA_DIR}/{_pack.dataset}",
                # one per member, in the order of the outputs (run_cells pairs them)
                partitions=[partition_path(c, s, "npz") for c, s in _pack.members],
                manifests=sorted({partition_path(c, s, "json") for c, s in _pack.members}),
            output:
                [directory(run_dir(c, s)) for c, s in _pack.members],
            params:
                cells=[c for c, _ in _pack.members],
                seeds=[s for _, s in _pack.members],
                cfgs=[cell_params(c) for c, _ in _pack.members],
            log:
                f"{RESULTS}/logs/run/packs/{_pack.name}.log",
            benchmark:
                f"{RESULTS}/benchmarks/run/packs/{_pack.name}.tsv"
            threads: res("run", "threads", 2)
            resources:
                mem_mb=res("run", "mem_mb", 8000),
                runtime=res("run", "runtime", 240),
                gpu=lambda w: run_gpus(),
            conda:
                "../envs/robustfl.yaml"
            script:
                "../scripts/run_pack.py"


onstart:
    run_gpus()  # the device check (rules/common.smk), before the first job runs
    # A remote executor (SLURM) starts each job with --target-jobs RULE:WILDCARD=VALUE,..., which snakemake
    # splits at every comma, so a run_cell job whose cell id holds commas cannot run there; pack rules
    # have no wildcards.
    if PACK <= 1 and workflow.non_local_exec:
        todo = [d for d in run_dirs(STUDY) if "," in Path(d).parent.name and not Path(d).exists()]
        if todo:
            raise WorkflowError(
                f"config error: pack: 1 cannot run on a remote executor ({len(todo)} runs to do, e.g. {todo[0]}: "
                "snakemake's --target-jobs splits a cell id at its commas); use --config pack=N with N >= 2")
