"""``run_eval`` end to end on a tiny random model saved as a local model folder."""

import argparse
import json

import numpy as np
import pytest
import torch
from conftest import CHATML, make_tokenizer

from forvalue.bench.evals.eval import add_eval_arguments, run_eval
from forvalue.bench.evals.methods import METHODS

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("tied").to(torch.float32).save_pretrained(path)
    make_tokenizer(CHATML).save_pretrained(path)
    return path


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_mislabeled_every_method_writes_results_and_plots(model_dir, tmp_path):
    result = run_eval(_args("--task", "mislabeled", "--model", str(model_dir), "--out", str(tmp_path)))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["task"] == "mislabeled" and written["model"] == str(model_dir)
    defaults = {m.name for m in METHODS if m.by_default}
    assert set(written["methods"]) == defaults
    assert "forvalue-response-precond-valid-cosine-skip" in written["methods"]  # select's default
    for entry in written["methods"].values():
        for key in ("auc_mean", "auc_std", "recall_mean", "seconds", "peak_mb"):
            assert np.isfinite(entry[key]), key
    autograd = written["methods"]["autograd-lastlayer"]
    assert autograd["max_rel_diff_vs_forvalue"] < 1e-4
    assert written["methods"]["datainf"]["warmup_seconds"] > 0
    assert written["methods"]["forvalue-response-precond-valid-cosine-warm"]["warmup_seconds"] > 0
    reference = written["methods"]["forvalue-response"]
    assert 0 < reference["reference_seconds"] < reference["seconds"]
    assert "reference_seconds" not in written["methods"]["forvalue-pairwise-response"]
    for name in ("lora-less", "forvalue-response", "forvalue-all-precond-train"):
        assert 0 <= written["methods"][name]["per_class_auc_mean"] <= 1, name
    for png in ("roc.png", "distributions.png", "time_auc.png"):
        assert (tmp_path / png).stat().st_size > 0
    assert set(np.load(tmp_path / "values.npz").files) == defaults


def test_identification_runs_the_chosen_methods_per_pair(model_dir, tmp_path):
    result = run_eval(_args("--task", "math", "--model", str(model_dir), "--out", str(tmp_path),
                            "--methods", "forvalue-response,tfidf-cosine,forvalue-pairwise-all",
                            "--no-plots"))
    # forvalue-pairwise-* is the same as forvalue-* on identification tasks: not run twice.
    assert set(result["methods"]) == {"forvalue-response", "tfidf-cosine"}
    assert np.load(tmp_path / "values.npz")["forvalue-response"].shape == (40, 10)


def test_cold_plus_warm_adds_its_sources_values_and_times(model_dir, tmp_path):
    cold = "forvalue-response-precond-valid-cosine-skip"
    both, warm = f"{cold}-cold-plus-warm", f"{cold}-warm"
    result = run_eval(_args("--task", "mislabeled", "--model", str(model_dir), "--out", str(tmp_path),
                            "--methods", both, "--no-plots"))
    assert list(result["methods"]) == [cold, warm, both]  # the sources, run first, are reported too
    values = np.load(tmp_path / "values.npz")
    np.testing.assert_allclose(values[both], values[cold] + values[warm], rtol=1e-12)
    assert not np.allclose(values[cold], values[warm])  # the warm-up changed the model
    entries = result["methods"]
    assert entries[both]["seconds"] >= entries[cold]["seconds"] + entries[warm]["seconds"]
    assert entries[both]["warmup_seconds"] == entries[warm]["warmup_seconds"] > 0


def test_unknown_method_is_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        run_eval(_args("--task", "math", "--model", str(model_dir), "--out", str(tmp_path),
                       "--methods", "forvalue-nope"))


def test_per_class_mislabel_auc_counts_clean_samples_of_the_class():
    from forvalue.bench.evals.metrics import per_class_mislabel_metrics

    classes = np.array([0, 0, 0, 1, 1, 1])
    flipped = np.array([False, False, True, False, False, True])
    # Column 0 (class 0) ranks its two clean samples first; column 1 (class 1) ranks the
    # flipped sample of class 1 above one clean one: 7 of 8 pairs in order.
    pairwise = np.array([[5, 0], [4, 1], [3, 2], [2, 6], [1, 3], [0, 4]], dtype=float)
    found = per_class_mislabel_metrics(pairwise, classes, flipped, np.array([0, 1]))
    assert found["per_class_auc_mean"] == pytest.approx((1.0 + 7 / 8) / 2)


def test_downstream_selects_fine_tunes_and_compares(model_dir, tmp_path):
    result = run_eval(_args("--task", "downstream", "--model", str(model_dir), "--out", str(tmp_path),
                            "--seeds", "1", "--seed", "3"))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["seeds"] == [3] and set(written["methods"]) == set(result["methods"])
    for name, m in written["methods"].items():
        assert np.isfinite(m["nll_mean"]) and 0 <= m["exact_match_mean"] <= 1, name
        assert np.isfinite(m["fact_nll_mean"]) and m["fact_nll_mean"] > 0, name
        assert len(written["runs"][name]) == 1
    assert written["methods"]["pool"]["clean_share_mean"] == pytest.approx(0.6)
    assert written["methods"]["oracle-clean"]["clean_share_mean"] == 1.0
    compared = written["comparisons"]["lora-less vs random"]
    assert {"nll_gain", "beats", "fact_nll_gain", "fact_beats"} <= set(compared)
    assert (tmp_path / "downstream.png").stat().st_size > 0


def test_downstream_runs_the_methods_asked_for(model_dir, tmp_path):
    result = run_eval(_args("--task", "downstream-facts", "--model", str(model_dir), "--out", str(tmp_path),
                            "--seeds", "1", "--methods", "random,oracle-clean", "--no-plots"))
    assert list(result["methods"]) == ["random", "oracle-clean"]
    with pytest.raises(SystemExit, match=r"unknown downstream method.*lora-tracin"):
        run_eval(_args("--task", "downstream", "--model", str(model_dir), "--out", str(tmp_path),
                       "--methods", "random,lora-tracin"))


def test_targeted_selects_for_each_target_fine_tunes_and_compares(model_dir, tmp_path):
    from forvalue.bench.evals.targeted_task import TARGETS

    methods = ["forvalue-response-precond-valid-cosine-skip", "rds-plus-round-robin", "lora-less", "random",
               "ceiling", "pool", "pool-equal-epochs", "index-round-robin",
               "forvalue-response-precond-valid-cosine-skip-warm",
               "forvalue-response-precond-valid-cosine-skip-warm-in-cold-round-robin"]
    args = ("--task", "targeted", "--model", str(model_dir), "--out", str(tmp_path),
            "--methods", ",".join(methods))
    result = run_eval(_args(*args, "--seeds", "1", "--seed", "2"))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["seeds"] == [2] and set(written["methods"]) == set(TARGETS) == set(result["methods"])
    assert (tmp_path / "targeted.png").stat().st_size > 0
    table = (tmp_path / "table.md").read_text()  # every method a row; the headline against the others
    assert all(f"| {name} |" in table for name in methods) and "mean over targets" in table
    # A second run with a seed more keeps the first seed's runs and adds the new seed's.
    resumed = run_eval(_args(*args, "--seeds", "2", "--seed", "2"))
    assert resumed["seeds"] == [2, 3] and resumed["earlier_seconds"] == written["seconds"]
    for target in TARGETS:
        for name in methods:
            first, *more = resumed["runs"][target][name]
            assert first == written["runs"][target][name][0] and [r["seed"] for r in more] == [3]
    for target, by_method in written["methods"].items():
        assert list(by_method) == methods
        for name, m in by_method.items():
            assert 0 <= m["exact_match_mean"] <= 1 and np.isfinite(m["nll_mean"]), (target, name)
            assert 0 <= m["target_share_mean"] <= 1 and 0 <= m["clean_share_mean"] <= 1
        assert by_method["ceiling"]["target_share_mean"] == by_method["ceiling"]["clean_share_mean"] == 1.0
        assert by_method["random"]["target_share_mean"] < 1
        assert by_method["index-round-robin"]["index_build_seconds_mean"] > 0
        compared = written["comparisons"][target]["lora-less vs random"]
        assert {"exact_match_gain", "exact_match_beats", "nll_gain", "nll_beats"} == set(compared)
    with pytest.raises(SystemExit, match=r"unknown targeted method.*lora-tracin"):
        run_eval(_args("--task", "targeted", "--model", str(model_dir), "--out", str(tmp_path),
                       "--methods", "random,lora-tracin"))
    kept = (tmp_path / "results.json").read_text()  # another setup at the same --out is refused
    with pytest.raises(SystemExit, match=r"holds another run \(other methods\): choose another --out"):
        run_eval(_args("--task", "targeted", "--model", str(model_dir), "--out", str(tmp_path),
                       "--methods", "random"))
    assert (tmp_path / "results.json").read_text() == kept


def test_targeted_values_shared_across_targets_equal_each_targets_own(model_dir):
    """A method valued once against every target's validation chats, then sliced, gives the
    values it gives against one target's chats alone."""
    from forvalue.bench.evals import targeted
    from forvalue.bench.evals.methods import Context
    from forvalue.bench.evals.targeted_task import make_targeted
    from forvalue.bench.evals.tasks import Task
    from forvalue.engine import load_model

    model, task = load_model(str(model_dir)), make_targeted("small", 0)
    for method in (m for m in METHODS if m.name in ("forvalue-response", "rds-plus")):
        cache = {}
        for target in targeted.TARGETS:
            shared = targeted.method_values(model, task, target, method.name, 8, cache)
            ctx = Context(model, Task("t", "selection", task.pool, task.valid[target], loss_on="response"),
                          loss_on="response", lora_rank=8, progress=False)
            alone = np.asarray(method.pairwise(ctx))
            np.testing.assert_allclose(shared, alone, rtol=1e-5, atol=1e-6 * np.abs(alone).max())


def test_targeted_warm_in_cold_and_cold_plus_warm_combine_the_cold_and_warmed_values(model_dir):
    from forvalue.bench.evals import targeted
    from forvalue.bench.evals.targeted_task import make_targeted
    from forvalue.engine import load_model

    model, task, cache = load_model(str(model_dir)), make_targeted("small", 0), {}
    target = targeted.TARGETS[1]
    values = targeted.method_values(model, task, target, targeted.WARM_IN_COLD, 8, cache)
    cold, warm = (cache[(target, name)].mean(axis=1) for name in (targeted.VALUED[0], targeted.WARM))
    kept = np.isfinite(values).all(axis=1)
    assert kept.sum() == targeted.SHORTLIST * targeted.budget_of(len(task.pool))
    assert cold[kept].min() >= cold[~kept].max()  # the cold default's best rows
    np.testing.assert_array_equal(values[kept].mean(axis=1), warm[kept])
    chosen = targeted.choose(model, task, target, targeted.WARM_IN_COLD, 0, 8, cache)
    assert set(chosen) <= set(np.flatnonzero(kept)) and len(chosen) == targeted.budget_of(len(task.pool))
    both = targeted.method_values(model, task, target, targeted.COLD_PLUS_WARM, 8, cache)
    np.testing.assert_array_equal(both, cache[(target, targeted.VALUED[0])] + cache[(target, targeted.WARM)])
