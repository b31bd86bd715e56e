"""The seed of the generated-structure test (``test_grammar.py``): ``SPARSEFLOW_GRAMMAR_SEED``, or a random one
drawn once per run (before any xdist worker starts, so that every worker uses it), shown in the report header."""

from __future__ import annotations

import os
import random


def pytest_configure(config):
    if not os.environ.get("SPARSEFLOW_GRAMMAR_SEED"):
        os.environ["SPARSEFLOW_GRAMMAR_SEED"] = str(random.SystemRandom().randrange(2**32))


def pytest_report_header(config):
    seed = os.environ.get("SPARSEFLOW_GRAMMAR_SEED")
    return f"test_grammar: hypothesis seed {seed} (SPARSEFLOW_GRAMMAR_SEED={seed} reproduces the run)"
