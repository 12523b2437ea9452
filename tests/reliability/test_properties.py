"""Property-based tests of every recipe (hypothesis): random tiny MLPs and CNNs, batch
sizes, losses, parameter dtypes (float64, float32, bfloat16: natively where the recipe
runs on it, else with float32 factors through
:func:`~fprecond.transforms.precision.with_precision`) and hyper-parameters drawn from
each recipe's ranges (:mod:`tests.reliability.cases`).

For each draw, 20 full-batch steps: every update is finite and has the parameters'
structure, shapes and dtypes, the parameters stay finite, no step is skipped on these
well-posed problems, and the loss ends below a bound of its start; with the case's
default (reasonable) settings it goes down.

Examples are derandomised (the same draws in every run) and few per recipe, to keep the
suite's time budget; ``FPRECOND_HYPOTHESIS_EXAMPLES`` raises the count for a longer
search.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fprecond as fp
from fprecond.transforms.precision import with_precision
from fprecond.tree import tree_all_finite

from tests.reliability.cases import (DTYPES, RECIPES, Range, RecipeCase, assert_finite_like, counters, loss_bound,
                                     tiny_problem)

EXAMPLES = int(os.environ.get("FPRECOND_HYPOTHESIS_EXAMPLES", "3"))
STEPS = 20
PROPERTIES = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def strategy(value_range: Range) -> st.SearchStrategy[Any]:
    """A hypothesis strategy for one :class:`~tests.reliability.cases.Range`."""
    if value_range.kind == "choice":
        return st.sampled_from(value_range.choices)
    if value_range.kind == "int":
        return st.integers(int(value_range.low), int(value_range.high))
    if value_range.kind == "log":
        exponents = st.floats(math.log(value_range.low), math.log(value_range.high))
        return exponents.map(lambda e: min(max(math.exp(e), value_range.low), value_range.high))
    return st.floats(value_range.low, value_range.high)


@st.composite
def draws(draw: st.DrawFn, case: RecipeCase) -> dict[str, Any]:
    """A tiny problem and the recipe's settings."""
    architecture = draw(st.sampled_from(["mlp", "cnn"]))
    problem = {
        "architecture": architecture,
        "width": draw(st.integers(2, 5) if architecture == "mlp" else st.integers(2, 4)),
        "classes": draw(st.integers(2, 4)),
        "batch_size": draw(st.integers(2, 10)),
        "loss": draw(st.sampled_from(["cross_entropy", "mse"])),
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "seed": draw(st.integers(0, 2 ** 16)),
    }
    chosen = {name: draw(strategy(value_range)) for name, value_range in case.ranges.items()}
    return {"problem": problem, "settings": chosen}


def train(case: RecipeCase, problem_settings: dict[str, Any], recipe_settings: dict[str, Any]
          ) -> tuple[float, float, Any]:
    """20 steps on one batch, checking every update and the parameters after it;
    returns the loss before and after and the final state."""
    problem = tiny_problem(**problem_settings)
    if problem_settings["dtype"] in case.dtypes:
        transform = case.make(problem.model, problem.batch[0], **recipe_settings)
    else:  # bfloat16 parameters, float32 factors
        transform = with_precision(case.make(problem.model, problem.batch[0].float(), **recipe_settings))
    params = problem.params
    state = transform.init(params)
    key = fp.random.key(problem_settings["seed"])
    initial = float(problem.loss(params))
    for _ in range(STEPS):
        _, grads = fp.loss_and_grads(problem.model, params, problem.batch)
        updates, state = transform.update(grads, state, params, batch=problem.batch, key=key)
        assert_finite_like(updates, params)
        params = fp.apply_updates(params, updates)
        assert bool(tree_all_finite(params))
    return initial, float(problem.loss(params)), state


@pytest.mark.parametrize("name", list(RECIPES))
def test_updates_are_finite_and_shaped_like_the_parameters(name):
    case = RECIPES[name]

    @PROPERTIES
    @given(draws(case))
    def check(drawn: dict[str, Any]) -> None:
        initial, final, state = train(case, drawn["problem"], drawn["settings"])
        assert math.isfinite(final) and final <= loss_bound(initial), (initial, final, drawn)
        found = counters(state)
        assert found.get("skipped", 0) == 0, found

    check()


@pytest.mark.parametrize("name", list(RECIPES))
def test_default_settings_lower_the_loss(name):
    """The case's defaults on a float32 MLP: 20 steps lower the loss by a tenth at least."""
    case = RECIPES[name]
    initial, final, state = train(case, {"architecture": "mlp", "width": 4, "classes": 3, "batch_size": 8,
                                         "loss": "cross_entropy", "dtype": "float32", "seed": 0}, {})
    assert final < 0.9 * initial, (initial, final)
    assert all(value == 0 for value in counters(state).values()), counters(state)
