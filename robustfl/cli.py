"""Command line: ``robustfl run`` (one cell without Snakemake, the pipeline's outputs) and ``robustfl list``
(the registered datasets, models, attacks and defenses with their sources)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

#: the registries ``robustfl list`` prints, in this order
KINDS = ("datasets", "models", "attacks", "defenses")


class CliError(ValueError):
    """A bad argument: one line naming it (and the valid choices)."""


def registries() -> dict[str, Any]:
    from robustfl.aggregation.defenses import DEFENSES
    from robustfl.attacks import ATTACKS
    from robustfl.data.datasets import DATASETS
    from robustfl.models import MODELS

    return {"datasets": DATASETS, "models": MODELS, "attacks": ATTACKS, "defenses": DEFENSES}


def summary(fn: Callable[..., Any]) -> str:
    """The first paragraph of an implementation's docstring (what it is and its source), on one line."""
    para = (fn.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(para.split()) or "(no description)"


def list_text(kinds: Sequence[str] = KINDS) -> str:
    regs = registries()
    lines = []
    for kind in kinds:
        reg = regs[kind]
        lines.append(f"{kind}:")
        width = max(len(n) for n in reg.names())
        lines += [f"  {n:<{width}}  {summary(reg.get(n))}" for n in reg.names()]
    return "\n".join(lines)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are YAML (``rounds=5``, ``attack_params={radius: 0.5}``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise CliError(f"--set {key.strip()}: value {value!r} is not valid YAML ({e.__class__.__name__})") from None
    return out


def _choice(kind: str, name: str) -> None:
    reg = registries()[kind]
    if name not in reg:
        raise CliError(f"--{kind[:-1]} {name!r} is not registered; choices: {', '.join(reg.names())}")


def run_config(args: argparse.Namespace) -> Any:
    """The cell's RunConfig from the arguments (``--set`` last, so it can set any field)."""
    from robustfl.config import RunConfig

    _choice("datasets", args.dataset)
    if args.attack != "none":
        _choice("attacks", args.attack)
    _choice("defenses", args.defense)
    fields: dict[str, Any] = {"dataset": args.dataset, "attack": args.attack, "defense": args.defense,
                              "seed": args.seed, "device": args.device}
    if args.attack != "none":
        fields["n_attackers"] = 1
    fields.update(parse_sets(args.set or []))
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CliError(f"--set {unknown[0]}: not a run setting; valid: {', '.join(sorted(known))}")
    try:
        return RunConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CliError(str(e).splitlines()[0]) from None


def data_spec(config_path: Path | None, dataset: str) -> tuple[dict[str, Any], Path, Path, Path]:
    """The dataset's source (mirror/download) and the data, partition and results directories, from the
    pipeline's config file when one is given or ``config.yaml`` exists here, else the defaults."""
    cfg: dict[str, Any] = {}
    path = config_path or (Path("config.yaml") if Path("config.yaml").is_file() else None)
    if path is not None:
        if not path.is_file():
            raise CliError(f"--config {str(path)!r}: no such file")
        cfg = yaml.safe_load(path.read_text()) or {}
    data_cfg = cfg.get("data", {})
    spec = dict((data_cfg.get("datasets") or {}).get(dataset) or {"download": True})
    return (spec, Path(data_cfg.get("dir", "data/cache")), Path(data_cfg.get("partitions_dir", "data/partitions")),
            Path(cfg.get("results_dir", "results")))


class Progress:
    """One line per round: a bar, accuracy, ASR and the attackers' mean aggregation weight."""

    def __init__(self, rounds: int, stream: Any = None, width: int = 20) -> None:
        self.rounds, self.stream, self.width = rounds, stream, width

    def __call__(self, row: dict[str, Any]) -> None:
        r = int(row["round"])
        done = round(self.width * r / self.rounds)
        parts = [f"[{'#' * done}{'.' * (self.width - done)}] round {r}/{self.rounds}",
                 f"acc {row['test_acc']:.4f}"]
        if row.get("asr") is not None and row["asr"] == row["asr"]:
            parts.append(f"ASR {row['asr']:.4f}")
        if row.get("mal_weight") is not None and row["mal_weight"] == row["mal_weight"]:
            parts.append(f"attackers' weight {row['mal_weight']:.4f}")
        print("  ".join(parts), file=self.stream or sys.stderr, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from robustfl.data import datasets
    from robustfl.fl import experiment

    cfg = run_config(args)
    spec, data_dir, part_dir, results = data_spec(args.config, cfg.dataset)
    prepared = datasets.prepare(cfg.dataset, spec, data_dir / cfg.dataset)
    part = part_dir / f"{experiment.partition_key(cfg)}.npz"
    if not part.is_file():
        part.parent.mkdir(parents=True, exist_ok=True)
        experiment.build_partition(prepared, cfg, part)
    cid = experiment.cell_id(cfg)
    out = Path(args.out) if args.out else results / "runs" / cid / f"seed{cfg.seed}"
    if (out / "run.json").is_file():
        print(f"{out} is already done (run.json exists); remove it to run again", file=sys.stderr)
        return 0
    print(f"cell {cid} seed {cfg.seed} -> {out}", file=sys.stderr)
    final = experiment.run_cell(cfg, prepared, part, out, cell={"cell_id": cid}, on_round=Progress(cfg.rounds))
    print(json.dumps({k: final[k] for k in ("test_acc", "asr") if k in final}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    bad = [k for k in args.kinds if k not in KINDS]
    if bad:
        raise CliError(f"{bad[0]!r} is not a kind; choices: {', '.join(KINDS)}")
    print(list_text(args.kinds or KINDS))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustfl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one cell (dataset x attack x defense x seed) without Snakemake")
    r.add_argument("--dataset", required=True)
    r.add_argument("--attack", default="none")
    r.add_argument("--defense", default="fedavg")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any run setting (config.yaml's cell fields), repeatable: --set rounds=5")
    r.add_argument("--config", type=Path, help="pipeline config for data sources and directories "
                                               "(default: ./config.yaml if present)")
    r.add_argument("--out", help="run directory (default: <results_dir>/runs/<cell id>/seed<seed>)")
    r.set_defaults(func=cmd_run)
    ls = sub.add_parser("list", help="the registered datasets, models, attacks and defenses")
    ls.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {', '.join(KINDS)} (default: all)")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"robustfl {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
