"""The evaluation product (``evals``: ``forvalue eval``'s tasks, methods and baselines) and the
performance benchmarks (``perf``); results in bench/results/, one-off diagnoses in
bench/experiments/ (scripts, not installed)."""

if __name__ != "forvalue.bench":  # reached as `bench` through the repository root: kernels/toplevel.py
    from runpy import run_path

    run_path(f"{__path__[0]}/../kernels/toplevel.py")["yield_name"](__name__, __file__)
