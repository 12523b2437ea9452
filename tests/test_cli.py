"""The command line, end to end in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_trains_and_the_loss_falls():
    result = subprocess.run([sys.executable, "-m", "fprecond", "demo", "--epochs", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses = [float(x) for x in re.findall(r"train loss ([0-9.]+)", result.stdout)]
    accuracies = [float(x) for x in re.findall(r"test accuracy ([0-9.]+)", result.stdout)]
    assert len(losses) == 3 and losses[-1] < 0.6 * losses[0]
    assert accuracies[-1] > 0.85 > accuracies[0]


def test_bad_arguments_exit_non_zero_with_a_message():
    result = subprocess.run([sys.executable, "-m", "fprecond", "demo", "--epochs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--epochs" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fprecond", "nonsense"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice" in result.stderr
