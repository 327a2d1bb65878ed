"""The evaluation product behind ``forvalue eval``: tasks, methods, gradient baselines, metrics and plots."""
