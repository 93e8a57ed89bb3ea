# Stage 1: decode each dataset once into the uint8 .npy cache (robustfl.data.datasets.prepare).


rule prepare_data:
    output:
        directory(f"{DATA_DIR}/{{dataset}}"),
    params:
        spec=lambda w: dataset_spec(w.dataset),
        raw_dir=lambda w: f"{RAW_DIR}/{w.dataset}",
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_data/{{dataset}}.tsv"
    threads: res("prepare", "threads", 2)
    resources:
        mem_mb=res("prepare", "mem_mb", 8000),
        runtime=res("prepare", "runtime", 60),
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/prepare_data.py"
