# Stage 4: collect every run of a study into tidy frames and the seed-aggregated summary.


rule aggregate:
    input:
        runs=lambda w: run_dirs(w.study),
    output:
        rounds=f"{RESULTS}/studies/{{study}}/all_rounds.csv",
        clients=f"{RESULTS}/studies/{{study}}/all_clients.csv",
        summary=report(
            f"{RESULTS}/studies/{{study}}/summary.csv",
            caption="../reports/captions/summary.rst",
            category="Study",
            subcategory="Summary",
            labels={"file": "summary.csv", "study": "{study}"},
        ),
    log:
        f"{RESULTS}/logs/aggregate/{{study}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate/{{study}}.tsv"
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/aggregate.py"
