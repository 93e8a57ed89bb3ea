# Stage 2: client partitions, one per (dataset, partition key); the key (robustfl.fl.experiment.partition_key)
# holds exactly the fields the partition depends on, seed included, so every attack and defense of a
# setting trains on the same client data and a change elsewhere never rebuilds a partition.


rule partition:
    input:
        data=f"{DATA_DIR}/{{dataset}}",
    output:
        npz=f"{PART_DIR}/{{dataset}}/{{pkey}}.npz",
        manifest=f"{PART_DIR}/{{dataset}}/{{pkey}}.json",
    params:
        cfg=lambda w: partition_cfg(w.dataset, w.pkey),
    log:
        f"{RESULTS}/logs/partition/{{dataset}}/{{pkey}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/partition/{{dataset}}/{{pkey}}.tsv"
    threads: res("partition", "threads", 1)
    resources:
        mem_mb=res("partition", "mem_mb", 4000),
        runtime=res("partition", "runtime", 20),
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/partition.py"
