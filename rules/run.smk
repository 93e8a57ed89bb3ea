# Stage 3: one job per cell x seed (robustfl.experiment.run_cell). The output directory is named by the
# cell id (every non-default RunConfig field) and the seed, so changing a cell's parameters creates a
# new directory and reruns that cell only. The whole directory is the output: an interrupted job leaves
# nothing Snakemake trusts (it deletes the directory; --rerun-incomplete reruns it), while the library's
# resume checkpoint lives next to it (runs/<cell>/.seed<N>.ckpt.pt) and survives to resume the rerun.


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
        gpu=RUN_GPU,
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/run_cell.py"
