"""Benchmarks of the kernels, the engine and the server, and the evaluation product
(``forvalue eval``: tasks, methods, baselines); results in bench/results/."""

if __name__ != "forvalue.bench":  # reached as `bench` through the repository root: kernels/toplevel.py
    from runpy import run_path

    run_path(f"{__path__[0]}/../kernels/toplevel.py")["yield_name"](__name__, __file__)
