"""AsyncEngine: values equal Valuator's; one answer per request under cancellation, deadlines,
overload and concurrent submitters; references built, merged, replaced, dropped; drain; stats."""

import asyncio
import functools
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forvalue.engine import Valuator, load_model
from forvalue.engine.serving.async_engine import AsyncEngine, EngineClosed, EngineOverloaded

from tiny_models import random_samples, tiny_model


@functools.cache
def model(kind="untied"):
    return load_model(tiny_model(kind, seed=21), dtype=torch.float64)


def valuator(normalize="none", kind="untied"):
    return Valuator(model(kind), normalize=normalize, progress=False)


class Gate:
    """Holds the worker thread at the start of each step until opened (to fill queues)."""

    def __init__(self, engine):
        self.open = threading.Event()
        self.entered = threading.Event()
        execute = engine.core.runner.execute

        def gated(step):
            self.entered.set()
            self.open.wait(timeout=30)
            return execute(step)

        engine.core.runner.execute = gated


def answers_counted(engine):
    """Record every answer the engine gives, by request id (a request answered twice shows)."""
    answered = []
    for name in ("_answer", "_answer_error"):
        original = getattr(engine, name)

        def record(request, *args, _original=original):
            answered.append(request.request_id)
            return _original(request, *args)

        setattr(engine, name, record)
    return answered


@pytest.mark.parametrize(("normalize", "kind"), [("none", "untied"), ("mean", "untied"),
                                                 ("cosine", "untied"), ("none", "softcap")])
def test_scores_and_references_equal_the_valuator(normalize, kind):
    train, valid = random_samples(7, seed=1, max_len=50), random_samples(4, seed=2, max_len=30)
    v = valuator(normalize, kind)
    ref = v.reference(valid)
    expected, tokens = v.score(train, ref, token_values=True)

    async def main():
        # A budget of 20 tokens chunks the longer samples.
        async with AsyncEngine(model(kind), batch_tokens=20, max_seqs=3) as engine:
            info = await engine.build_reference("valid", valid, normalize=normalize)
            assert (info.count, info.normalize, info.version) == (4, normalize, 1)
            torch.testing.assert_close(engine.get_reference("valid").gradient_sum, ref.gradient_sum)
            return await asyncio.gather(*[engine.score(s, "valid", token_values=True) for s in train])

    results = asyncio.run(main())
    # Gemma2's eager attention takes its softmax in float32: batching moves states by ~1e-7.
    tolerance = 1e-6 if kind == "softcap" else 1e-10
    assert [r.error for r in results] == [""] * len(train)
    np.testing.assert_allclose([r.value for r in results], expected, rtol=tolerance)
    for r, sample, tv in zip(results, train, tokens, strict=True):
        assert r.id == sample["id"] and r.num_tokens == len(sample["input_ids"])
        np.testing.assert_allclose(r.token_values.values, tv.values, rtol=tolerance,
                                   atol=tolerance * np.abs(tv.values).max())
        assert r.token_values.values.sum() == pytest.approx(r.value, rel=1e-12)


def test_short_requests_finish_before_an_earlier_long_one():
    long = random_samples(1, seed=3, min_len=60, max_len=60)[0]
    shorts = random_samples(3, seed=4, max_len=6)

    async def main():
        async with AsyncEngine(model(), batch_tokens=8) as engine:
            engine.put_reference("v", valuator().reference(shorts))
            order = []

            async def score(sample):
                order.append((await engine.score(sample, "v")).id)

            await asyncio.gather(score(long), *[score(s) for s in shorts])
            return order

    order = asyncio.run(main())
    assert order[-1] == long["id"] and set(order[:-1]) == {s["id"] for s in shorts}


def test_overload_cancel_deadline_and_bad_samples_each_get_their_answer():
    samples = random_samples(6, seed=5)

    async def main():
        engine = AsyncEngine(model(), batch_tokens=64, max_waiting=2)
        engine.put_reference("v", valuator().reference(samples[:2]))
        gate = Gate(engine)
        async with engine:
            first = engine.submit(samples[0], "v")  # taken into the first (held) step
            await asyncio.to_thread(gate.entered.wait, 10)
            cancelled = engine.submit(samples[1], "v")
            expired = engine.submit(samples[2], "v", timeout=0.0)
            with pytest.raises(EngineOverloaded, match="full"):
                engine.submit(samples[3], "v")
            assert engine.cancel(cancelled.request_id) and not engine.cancel(cancelled.request_id)
            bad = engine.submit({"id": "bad", "input_ids": [1, 2], "loss_mask": [1, 0]}, "v")
            unknown = engine.submit(samples[4], "nope")
            gate.open.set()
            return [await h for h in (first, cancelled, expired, bad, unknown)], engine.stats()

    (first, cancelled, expired, bad, unknown), stats = asyncio.run(main())
    assert first.error == "" and np.isfinite(first.value)
    assert cancelled.error == "cancelled" and np.isnan(cancelled.value)
    assert "deadline" in expired.error
    assert bad.id == "bad" and "nothing to value" in bad.error
    assert "unknown reference 'nope'" in unknown.error
    assert stats.requests["overloaded"] == 1 and stats.requests["cancelled"] == 1
    assert stats.requests["expired"] == 1 and stats.requests["scored"] == 1


def test_cancelling_the_caller_cancels_the_request():
    samples = random_samples(2, seed=6)

    async def main():
        engine = AsyncEngine(model())
        engine.put_reference("v", valuator().reference(samples))
        gate = Gate(engine)
        answered = answers_counted(engine)
        async with engine:
            blocker = engine.submit(samples[0], "v")
            await asyncio.to_thread(gate.entered.wait, 10)
            caller = asyncio.ensure_future(engine.score(samples[1], "v"))
            await asyncio.sleep(0.01)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            assert engine.core.scheduler.num_waiting == 0
            gate.open.set()
            await blocker
        return answered, engine.stats()

    answered, stats = asyncio.run(main())
    assert len(answered) == len(set(answered)) == 2 and stats.requests["cancelled"] == 1


def test_replacing_a_reference_affects_only_requests_admitted_after():
    train = random_samples(3, seed=7)
    old_valid, new_valid = random_samples(2, seed=8), random_samples(2, seed=9)
    v = valuator()
    old_ref, new_ref = v.reference(old_valid), v.reference(new_valid)

    async def main():
        engine = AsyncEngine(model(), max_seqs=1)
        engine.put_reference("v", old_ref)
        gate = Gate(engine)
        async with engine:
            before = [engine.submit(s, "v") for s in train]
            await asyncio.to_thread(gate.entered.wait, 10)  # one running, two waiting
            info = engine.put_reference("v", new_ref)
            after = [engine.submit(s, "v") for s in train]
            gate.open.set()
            return info, [(await h).value for h in before], [(await h).value for h in after]

    info, before, after = asyncio.run(main())
    assert info.version == 2
    np.testing.assert_allclose(before, v.score(train, old_ref), rtol=1e-10)
    np.testing.assert_allclose(after, v.score(train, new_ref), rtol=1e-10)


def test_references_merge_list_and_drop():
    train, valid = random_samples(3, seed=10), random_samples(5, seed=11)
    v = valuator()
    whole = v.reference(valid)

    async def main():
        async with AsyncEngine(model(), batch_tokens=32) as engine:
            await engine.build_reference("v", valid[:2])
            bad = {"id": "bad", "input_ids": [1]}
            info = await engine.build_reference("v", [*valid[2:], bad], merge=True)
            engine.put_reference("other", whole)
            listed = sorted(i.name for i in engine.references())
            values = [(await engine.score(s, "v")).value for s in train]
            dropped = engine.drop_reference("other"), engine.drop_reference("other")
            late = await engine.score(train[0], "other")
            return info, listed, values, dropped, late

    info, listed, values, dropped, late = asyncio.run(main())
    assert (info.count, info.skipped, info.version) == (5, 1, 2)
    assert listed == ["other", "v"] and dropped == (True, False)
    np.testing.assert_allclose(values, v.score(train, whole), rtol=1e-10)
    assert "unknown reference 'other'" in late.error


def test_drain_answers_everything_then_refuses_new_work():
    samples = random_samples(8, seed=12)

    async def main():
        engine = AsyncEngine(model(), batch_tokens=16)
        engine.put_reference("v", valuator().reference(samples[:2]))
        async with engine:
            handles = [engine.submit(s, "v") for s in samples]
            await engine.drain()
            assert all(h.future.done() for h in handles)
            with pytest.raises(EngineClosed):
                engine.submit(samples[0], "v")
            return [h.future.result() for h in handles]

    assert all(r.error == "" for r in asyncio.run(main()))


def test_queue_delay_lets_a_callers_next_sample_join_the_next_step():
    samples = random_samples(3, seed=13)

    async def main(delay):
        async with AsyncEngine(model(), max_queue_delay=delay) as engine:
            engine.put_reference("v", valuator().reference(samples[:1]))
            await engine.score(samples[0], "v")
            steps = engine.stats().steps
            # Two callers answered by that step come back 50 ms apart, inside the delay.
            second = asyncio.ensure_future(engine.score(samples[1], "v"))
            await asyncio.sleep(0.05)
            third = asyncio.ensure_future(engine.score(samples[2], "v"))
            results = await asyncio.gather(second, third)
            assert all(r.error == "" for r in results)
            return engine.stats().steps - steps

    assert asyncio.run(main(delay=0.5)) == 1


def test_a_negative_queue_delay_is_refused():
    with pytest.raises(ValueError, match="max_queue_delay"):
        AsyncEngine(model(), max_queue_delay=-1)


def test_stream_applies_backpressure_and_stats_read_as_prometheus():
    samples = random_samples(12, seed=13)

    async def main():
        async with AsyncEngine(model(), batch_tokens=24, max_waiting=3) as engine:
            engine.put_reference("v", valuator().reference(samples[:3]))
            results = [r async for r in engine.score_stream(samples, "v")]
            return results, engine.stats(), engine.prometheus_text()

    results, stats, text = asyncio.run(main())
    assert sorted(r.id for r in results) == sorted(s["id"] for s in samples)
    assert all(r.error == "" and r.queue_seconds >= 0 and r.compute_seconds > 0 for r in results)
    assert stats.requests["scored"] == 12 and stats.tokens_total == sum(len(s["input_ids"]) for s in samples)
    assert "overloaded" not in stats.requests  # the stream waited for room instead
    assert 'forvalue_requests_total{outcome="scored"} 12' in text
    assert 'forvalue_total_latency_seconds{quantile="0.99"}' in text
    assert "# TYPE forvalue_waiting_requests gauge" in text


def test_the_forward_runs_off_the_event_loop():
    samples = random_samples(2, seed=14)

    async def main():
        engine = AsyncEngine(model())
        engine.put_reference("v", valuator().reference(samples))
        gate = Gate(engine)
        async with engine:
            handle = engine.submit(samples[0], "v")
            await asyncio.to_thread(gate.entered.wait, 10)
            # The step is in progress in the worker: the loop still runs other coroutines.
            ticks = 0
            for _ in range(5):
                await asyncio.sleep(0.001)
                ticks += 1
            assert not handle.future.done() and engine.stats().running == 1
            gate.open.set()
            return ticks, await handle

    ticks, result = asyncio.run(main())
    assert ticks == 5 and result.error == ""


submitter = st.lists(st.tuples(
    st.sampled_from(["ok", "ok", "ok", "bad", "unknown", "cancel", "deadline", "long"]),
    st.floats(0, 0.01)), min_size=1, max_size=8)


@settings(max_examples=15, deadline=None)
@given(submitters=st.lists(submitter, min_size=1, max_size=4), max_waiting=st.integers(1, 6),
       policy=st.sampled_from(["fcfs", "priority"]))
def test_every_request_gets_exactly_one_answer(submitters, max_waiting, policy):
    pool = random_samples(7, seed=15, max_len=40)
    long = random_samples(1, seed=16, min_len=60, max_len=60)[0]  # chunked: budget 16
    reference = valuator().reference(pool[:2])

    async def submit_all(engine, plan, seed):
        outcomes = []
        for i, (kind, pause) in enumerate(plan):
            sample = {"id": "bad", "text": 1} if kind == "bad" else long if kind == "long" \
                else pool[(seed + i) % len(pool)]
            try:
                handle = engine.submit(sample, "missing" if kind == "unknown" else "v",
                                       priority=i % 3, timeout=0.0 if kind == "deadline" else None)
            except EngineOverloaded:
                outcomes.append(("overloaded", None))
                continue
            if kind == "cancel":
                await asyncio.sleep(pause)
                engine.cancel(handle.request_id)
            outcomes.append((kind, handle))
            await asyncio.sleep(pause)
        return outcomes

    async def main():
        engine = AsyncEngine(model(), batch_tokens=16, max_seqs=2, max_waiting=max_waiting,
                             policy=policy)
        engine.put_reference("v", reference)
        answered = answers_counted(engine)
        async with engine:
            plans = await asyncio.gather(*[submit_all(engine, plan, k) for k, plan in enumerate(submitters)])
        return [o for plan in plans for o in plan], answered

    outcomes, answered = asyncio.run(main())
    assert len(answered) == len(set(answered))  # nobody answered twice
    for kind, handle in outcomes:
        if kind == "overloaded":
            continue
        result = handle.future.result()  # every admitted request was answered by the drain
        if kind in ("ok", "long"):
            assert result.error == "" and np.isfinite(result.value)
        elif kind == "cancel":
            assert result.error in ("", "cancelled")
        elif kind == "deadline":
            assert "deadline" in result.error
        else:
            assert result.error and np.isnan(result.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_scores_equal_the_float64_valuator():
    train, valid = random_samples(6, seed=17, max_len=50), random_samples(3, seed=18)
    v = valuator()
    expected = v.score(train, v.reference(valid))
    gpu_model = load_model(tiny_model("untied", seed=21), device="cuda", dtype=torch.float32)

    async def main():
        async with AsyncEngine(gpu_model, batch_tokens=24) as engine:
            await engine.build_reference("valid", valid)
            return await asyncio.gather(*[engine.score(s, "valid") for s in train])

    results = asyncio.run(main())
    np.testing.assert_allclose([r.value for r in results], expected, rtol=1e-3, atol=1e-4)


def test_a_stream_waits_for_results_without_spinning(monkeypatch):
    samples = random_samples(3, seed=19)
    gets = 0
    queue_get = asyncio.Queue.get

    async def counted_get(self):
        nonlocal gets
        gets += 1
        return await queue_get(self)

    monkeypatch.setattr(asyncio.Queue, "get", counted_get)

    async def main():
        engine = AsyncEngine(model(), batch_tokens=16)
        engine.put_reference("v", valuator().reference(samples))
        gate = Gate(engine)
        async with engine:
            results = []

            async def consume():
                results.extend([r async for r in engine.score_stream(samples, "v")])

            consumer = asyncio.ensure_future(consume())
            await asyncio.to_thread(gate.entered.wait, 10)
            await asyncio.sleep(0.2)  # every sample submitted, the first step held
            waits_while_held = gets
            gate.open.set()
            await consumer
            return waits_while_held, results

    waits_while_held, results = asyncio.run(main())
    assert waits_while_held <= 2 and len(results) == 3
