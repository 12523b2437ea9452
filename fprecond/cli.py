"""The ``fprecond`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fprecond", description="Functional gradient preconditioning on torch.func.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small MLP on scikit-learn's digits with a chain")
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    _add_bench(commands)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.epochs < 1 or args.batch_size < 1:
            parser.error("--epochs and --batch-size must be positive")
        from fprecond.demo import run_demo

        losses = run_demo(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        return 0 if losses[-1] < losses[0] else 1
    if args.command == "bench":
        return _run_bench(parser, args)
    return 2  # pragma: no cover - argparse rejects unknown commands


_SUITES = ("curvature", "recipes")
_RECIPES = ("sgd", "adam", "kfac", "ekfac", "natural_gradient", "unit_wise_ng", "diag_ng", "smw_ng", "seng",
            "newton_cg", "newton")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    # Choices are spelled out, not imported, so that building the parser (and ``--help``)
    # does not import torch; _run_bench checks the lists against the bench's own constants.
    bench = commands.add_parser(
        "bench", help="time and peak memory of curvature estimates and recipe steps, relative to a baseline",
        description="Two suites, each measurement in its own process. 'curvature' (the default): one curvature "
                    "estimate of each kind in each structure on an MLP and a CNN, as ratios to one "
                    "forward+backward pass of the same model. 'recipes': one training step of each recipe "
                    "(loss_and_grads + update + apply_updates) at each curvature/inverse interval, as ratios to "
                    "one SGD step; the MLP runs at batch 256 there.")
    bench.add_argument("--suite", default="curvature",
                       help="comma-separated, from: curvature, recipes (default curvature; the full recipe "
                            "suite takes about 20 minutes on one CPU)")
    bench.add_argument("--models", default="mlp,cnn", help="comma-separated, from: mlp, cnn")
    bench.add_argument("--kinds", default="empirical_fisher,fisher_mc,ggn,fisher,hessian",
                       help="curvature suite; comma-separated, from: empirical_fisher, fisher_mc, ggn, fisher, "
                            "hessian")
    bench.add_argument("--structures", default="kron,diag",
                       help="curvature suite; comma-separated, from: kron, unit, diag")
    bench.add_argument("--recipes", default=",".join(_RECIPES),
                       help=f"recipe suite; comma-separated, from: {', '.join(_RECIPES)} (default all; sgd, the "
                            "baseline, is always measured)")
    bench.add_argument("--intervals", default="1,10",
                       help="recipe suite; comma-separated positive ints: curvature_every = inverse_every for "
                            "each scheduled recipe (default 1,10)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="timed calls per measurement (default 5; 1 with --quick)")
    bench.add_argument("--warmup", type=int, default=2,
                       help="untimed calls before each timing (default 2; whole schedule periods for recipes)")
    bench.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: less noise)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--quick", action="store_true", help="tiny models and one repeat (a smoke test)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--timeout", type=float, default=None,
                       help="seconds per measurement before it is abandoned (default 600 for a curvature "
                            "estimate, 1800 for a recipe)")
    bench.add_argument("--output", default=None, metavar="PATH",
                       help="also write the results as JSON to PATH (with both suites: {\"suites\": {name: "
                            "report}})")


def _comma_list(parser: argparse.ArgumentParser, option: str, text: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in choices]
    if not items or unknown:
        parser.error(f"{option}: expected a comma-separated list from {', '.join(choices)}; got {text!r}")
    return tuple(dict.fromkeys(items))  # drop repeats, keep the order given


def _intervals(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        parser.error(f"--intervals: expected a comma-separated list of positive ints; got {text!r}")
    return tuple(dict.fromkeys(int(item) for item in items))


def _run_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    suites = _comma_list(parser, "--suite", args.suite, _SUITES)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1 or args.threads < 1 or (args.timeout is not None and args.timeout <= 0) or args.warmup < 0:
        parser.error("--repeats, --threads and --timeout must be positive and --warmup not negative")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    from fprecond.bench.curvature import KINDS, MODELS, STRUCTURES, BenchConfig, all_measured, run_bench
    from fprecond.bench.recipes import RECIPES, RecipeBenchConfig, run_recipe_bench

    models = _comma_list(parser, "--models", args.models, MODELS)
    # Options are checked before anything runs, whichever suites are chosen.
    curvature = BenchConfig(models=models, kinds=_comma_list(parser, "--kinds", args.kinds, KINDS),
                            structures=_comma_list(parser, "--structures", args.structures, STRUCTURES),
                            repeats=repeats, warmup=args.warmup, threads=args.threads, device=args.device,
                            quick=args.quick, seed=args.seed,
                            timeout=BenchConfig.timeout if args.timeout is None else args.timeout)
    recipes = RecipeBenchConfig(models=models, recipes=_comma_list(parser, "--recipes", args.recipes, tuple(RECIPES)),
                                intervals=_intervals(parser, args.intervals), repeats=repeats, warmup=args.warmup,
                                threads=args.threads, device=args.device, quick=args.quick, seed=args.seed,
                                timeout=RecipeBenchConfig.timeout if args.timeout is None else args.timeout)
    reports: dict[str, dict[str, Any]] = {}
    if "curvature" in suites:
        reports["curvature"] = run_bench(curvature)
    if "recipes" in suites:
        if reports:
            print()
        reports["recipes"] = run_recipe_bench(recipes)
    if args.output is not None:
        from fprecond.bench.runner import write_report

        write_report(args.output, reports[suites[0]] if len(reports) == 1 else {"suites": reports})
    # Every row is printed either way; a non-zero status tells scripts that some measurement failed.
    return 0 if all(all_measured(report) for report in reports.values()) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
