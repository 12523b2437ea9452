"""The ``fprecond`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fprecond", description="Functional gradient preconditioning on torch.func.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small MLP on scikit-learn's digits with a chain")
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.epochs < 1 or args.batch_size < 1:
            parser.error("--epochs and --batch-size must be positive")
        from fprecond.demo import run_demo

        losses = run_demo(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
        return 0 if losses[-1] < losses[0] else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
