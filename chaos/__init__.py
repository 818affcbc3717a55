"""Chaos: break the running demo mesh on purpose and prove what must still hold.

``python -m chaos SCENARIO [--short] [--seed N] [--report FILE]``; ``make chaos`` runs the
standard set. See ``chaos.scenarios`` for the scenarios and ``chaos.timeline`` for the report.
"""
