# Stage 7: the report. `snakemake --report <file>.html` collects every output wrapped in report() with
# its caption (reports/captions/*.rst); this rule adds the study's cell list (what each cell id means).


rule cells_manifest:
    output:
        report(
            f"{REPORTS}/{{study}}/cells.csv",
            caption="../reports/captions/cells.rst",
            category="Study",
            subcategory="Cells",
            labels={"file": "cells.csv", "study": "{study}"},
        ),
    params:
        cells=lambda w: manifest(study_cells(w.study)),
    log:
        f"{RESULTS}/logs/cells_manifest/{{study}}.log",
    conda:
        "../envs/robustfl.yaml"
    script:
        "../scripts/cells_manifest.py"
