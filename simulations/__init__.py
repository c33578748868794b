"""Data sets, splits, synthetic populations, reference trainers, experiments and reports."""
