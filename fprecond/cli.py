"""The ``fprecond`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn, Sequence


class _OneLineErrors(argparse.ArgumentParser):
    """A subcommand's usage errors as one line (``fprecond compare: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fprecond", description="Functional gradient preconditioning on torch.func.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrors)
    demo = commands.add_parser("demo", help="train a small MLP on scikit-learn's digits with a chain")
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    _add_bench(commands)
    _add_compare(commands)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.epochs < 1 or args.batch_size < 1:
            parser.error("--epochs and --batch-size must be positive")
        from fprecond.demo import run_demo

        losses = run_demo(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        return 0 if losses[-1] < losses[0] else 1
    if args.command == "bench":
        return _run_bench(parser, args)
    if args.command == "compare":
        return _run_compare(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


_SUITES = ("curvature", "recipes", "ensemble", "distributed")
_RECIPES = ("sgd", "adam", "kfac", "ekfac", "natural_gradient", "unit_wise_ng", "diag_ng", "smw_ng", "seng",
            "newton_cg", "newton", "shampoo", "shampoo_block128", "soap", "soap_block128", "psgd", "kbfgs", "muon",
            "sophia", "adahessian")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    # Choices are spelled out, not imported, so that building the parser (and ``--help``)
    # does not import torch; _run_bench checks the lists against the bench's own constants.
    bench = commands.add_parser(
        "bench", help="time and peak memory of curvature estimates and recipe steps, relative to a baseline",
        description="Two suites, each measurement in its own process. 'curvature' (the default): one curvature "
                    "estimate of each kind in each structure on an MLP and a CNN, as ratios to one "
                    "forward+backward pass of the same model. 'recipes': one training step of each recipe "
                    "(loss_and_grads + update + apply_updates) at each curvature/inverse interval, as ratios to "
                    "one SGD step; the MLP runs at batch 256 there. 'ensemble': one K-FAC step of an ensemble of 8 "
                    "MLPs, vmapped against a Python loop over the members. 'distributed': the K-FAC refresh (inverses) "
                    "and the EKFAC refresh (eigenbases) of an 8-layer MLP of width 1024 per rank, with the work "
                    "shared among 1, 2 and 4 gloo processes launched once.")
    bench.add_argument("--suite", default="curvature",
                       help="comma-separated, from: curvature, recipes, ensemble, distributed (default curvature; "
                            "the full recipe suite takes about 20 minutes on one CPU)")
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
    bench.add_argument("--worlds", default=None,
                       help="distributed suite; comma-separated world sizes including 1 (default 1,2,4; 1,2 with "
                            "--quick)")
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


def _intervals(parser: argparse.ArgumentParser, text: str, option: str = "--intervals") -> tuple[int, ...]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        parser.error(f"{option}: expected a comma-separated list of positive ints; got {text!r}")
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
    from fprecond.bench.distributed import DistributedBenchConfig, run_distributed_bench
    from fprecond.bench.ensemble import EnsembleBenchConfig, run_ensemble_bench
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
    ensemble = EnsembleBenchConfig(repeats=repeats, warmup=args.warmup, threads=args.threads, device=args.device,
                                   quick=args.quick, seed=args.seed,
                                   timeout=EnsembleBenchConfig.timeout if args.timeout is None else args.timeout)
    worlds = _intervals(parser, args.worlds, "--worlds") if args.worlds is not None else \
        ((1, 2) if args.quick else (1, 2, 4))
    if 1 not in worlds:
        parser.error(f"--worlds: must include 1 (the single-process baseline); got {args.worlds!r}")
    distributed = DistributedBenchConfig(repeats=repeats, warmup=args.warmup, threads=args.threads,
                                         quick=args.quick, seed=args.seed, worlds=worlds,
                                         timeout=DistributedBenchConfig.timeout if args.timeout is None
                                         else args.timeout)
    reports: dict[str, dict[str, Any]] = {}
    if "curvature" in suites:
        reports["curvature"] = run_bench(curvature)
    if "recipes" in suites:
        if reports:
            print()
        reports["recipes"] = run_recipe_bench(recipes)
    if "ensemble" in suites:
        if reports:
            print()
        reports["ensemble"] = run_ensemble_bench(ensemble)
    if "distributed" in suites:
        if reports:
            print()
        reports["distributed"] = run_distributed_bench(distributed)
    if args.output is not None:
        from fprecond.bench.runner import write_report

        write_report(args.output, reports[suites[0]] if len(reports) == 1 else {"suites": reports})
    # Every row is printed either way; a non-zero status tells scripts that some measurement failed.
    return 0 if all(all_measured(report) for report in reports.values()) else 1



def _add_compare(commands: argparse._SubParsersAction) -> None:
    compare = commands.add_parser(
        "compare", help="train one model with several methods; compare throughput, memory and accuracy",
        description="Trains one workload with several methods under the same initialisation, data order and "
                    "budget, each (method, seed) in its own process, and reports per method: step time (and its "
                    "ratio to SGD, always run as the baseline), samples/s, peak memory, final and best test "
                    "accuracy and loss, and steps/time to a target accuracy; as a table, results.json, "
                    "results.csv and PNG plots in --output.",
        epilog="Example: fprecond compare --methods sgd,adam,kfac,shampoo --set kfac.damping=1e-2 --epochs 5")
    compare.add_argument("--workload", default="mlp",
                         help="mlp | cnn (scikit-learn digits), transformer (sequence reversal generated in code), "
                              "npz (your own data, with --data); default mlp")
    compare.add_argument("--data", default=None, metavar="PATH",
                         help="an .npz file with inputs/targets (x/y) and optionally test_inputs/test_targets")
    compare.add_argument("--methods", default=None,
                         help="comma-separated (default sgd,adam,kfac,shampoo,soap,ekfac); see --list-methods")
    compare.add_argument("--set", action="append", default=[], metavar="METHOD.NAME=VALUE",
                         help="a setting of one method's recipe, e.g. kfac.damping=1e-2 (repeatable, or "
                              "comma-separated)")
    compare.add_argument("--list-methods", action="store_true", help="list the methods and their settings, and exit")
    compare.add_argument("--epochs", type=float, default=None, help="passes over the training split (default 10)")
    compare.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                         help="seconds of training per run (without --epochs: no epoch limit)")
    compare.add_argument("--batch-size", type=int, default=64)
    compare.add_argument("--seeds", type=int, default=1, help="runs per method, seeds 0..N-1: mean and spread")
    compare.add_argument("--curvature-every", type=int, default=None,
                         help="curvature/statistics interval of the methods that have one (default: theirs)")
    compare.add_argument("--inverse-every", type=int, default=None,
                         help="inverse/root/basis interval of the methods that have one (default: theirs)")
    compare.add_argument("--ensemble", type=int, default=1, metavar="K",
                         help="train K seeds at once with torch.func.vmap, and time a loop over them")
    compare.add_argument("--eval-every", type=int, default=None, help="steps between test evaluations (default 10)")
    compare.add_argument("--target-accuracy", type=float, default=0.9,
                         help="report steps and seconds to this test accuracy (default 0.9)")
    compare.add_argument("--reference", default=None, choices=("asdl",),
                         help="also run ASDL's implementation of each method it has (needs asdfghjkl)")
    compare.add_argument("--device", default=None, choices=("cpu", "cuda"),
                         help="default: cuda when available, else cpu")
    compare.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    compare.add_argument("--output", default="compare-results", metavar="DIR",
                         help="folder for results.json, results.csv and the plots (default compare-results)")
    compare.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is abandoned")


def _run_compare(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"fprecond compare: error: {message}", file=sys.stderr)
        return 2

    from fprecond.compare.methods import DEFAULT_METHODS, METHODS, MethodError, parse_settings

    if args.list_methods:
        for name, method in METHODS.items():
            print(f"{name:18} {method.summary}")
            print(f"{'':18} settings: {', '.join(method.parameters())}")
        return 0
    methods = tuple(dict.fromkeys(item.strip() for item in (args.methods or ",".join(DEFAULT_METHODS)).split(",")
                                  if item.strip()))
    unknown = [name for name in methods if name not in METHODS]
    if unknown or not methods:
        return fail(f"unknown method(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(METHODS)}")
    try:
        settings = parse_settings(args.set, methods)
    except MethodError as error:
        return fail(str(error))
    import torch

    from fprecond.compare.runner import CompareConfig, CompareError, run_compare

    epochs = args.epochs if args.epochs is not None else (None if args.time_budget is not None else 10.0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = CompareConfig(task=args.workload, data=args.data, methods=methods, settings=settings, epochs=epochs,
                           seconds=args.time_budget, batch_size=args.batch_size, seeds=args.seeds,
                           curvature_every=args.curvature_every, inverse_every=args.inverse_every,
                           ensemble=args.ensemble, eval_every=args.eval_every, target_accuracy=args.target_accuracy,
                           reference=args.reference, device=device, threads=args.threads, output=args.output,
                           timeout=args.timeout, plots=not args.no_plots)
    try:
        report = run_compare(config, show_progress=not args.no_progress and sys.stderr.isatty())
    except CompareError as error:
        return fail(str(error))
    # Diverged methods are results, and so is a reference implementation that fails (its row
    # says why); a run of fprecond's own that crashed is a failure of the command.
    return 0 if all(row["status"] in ("ok", "skipped") for row in report["rows"] if row["reference"] is None) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
