"""Scheduler: budgets, chunking, ordering, starvation, cancellation and deadlines (no model)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forvalue.engine.config import ValuationConfig
from forvalue.engine.core.request import Request, RequestStatus
from forvalue.engine.core.scheduler import QueueFull, Scheduler
from forvalue.engine.inputs.samples import EncodedSample
from forvalue.engine.outputs import RunnerOutput


def request(length: int, *, priority: int = 0, deadline: float | None = None, name: str = "") -> Request:
    mask = (False,) + (True,) * (length - 1)
    sample = EncodedSample(name or f"n{length}", "test", tuple(range(length)), mask, truncated=False)
    return Request(sample, priority=priority, deadline=deadline)


def settle(scheduler: Scheduler, output) -> list[Request]:
    """The step ran with no failure: the requests it completed."""
    completed, failed = scheduler.update_from_output(output, RunnerOutput())
    assert failed == []
    return completed


def run_step(scheduler: Scheduler, now: float = 0.0):
    """One step as the engine runs it; returns (output, completed requests)."""
    output = scheduler.schedule(now)
    return output, settle(scheduler, output)


def run_all(scheduler: Scheduler, limit: int = 10_000) -> list[Request]:
    order = []
    for _ in range(limit):
        if not scheduler.has_unfinished():
            return order
        order += run_step(scheduler)[1]
    raise AssertionError("the scheduler did not finish")


def test_packed_steps_fill_the_budget_in_arrival_order():
    scheduler = Scheduler(ValuationConfig(batch_tokens=10, max_seqs=8))
    reqs = [request(n) for n in (4, 4, 4, 2)]
    for r in reqs:
        scheduler.add(r)
    first, done = run_step(scheduler)
    # 4 + 4 fit, the third 4 does not, the 2 behind it fills the room left.
    assert [c.request for c in first.chunks] == [reqs[0], reqs[1], reqs[3]] and not first.is_chunk_step
    assert done == [reqs[0], reqs[1], reqs[3]]
    assert run_step(scheduler)[1] == [reqs[2]]


def test_max_seqs_caps_a_step():
    scheduler = Scheduler(ValuationConfig(batch_tokens=100, max_seqs=2))
    for _ in range(5):
        scheduler.add(request(3))
    assert [len(run_step(scheduler)[0].chunks) for _ in range(3)] == [2, 2, 1]


def test_long_request_is_chunked_and_alternates_with_packed_steps():
    scheduler = Scheduler(ValuationConfig(batch_tokens=8, max_seqs=4))
    long = request(20, name="long")
    scheduler.add(long)
    shorts = [request(3) for _ in range(4)]
    for r in shorts:
        scheduler.add(r)
    kinds = []
    while scheduler.has_unfinished():
        output, _ = run_step(scheduler)
        kinds.append("chunk" if output.is_chunk_step else "packed")
        if output.is_chunk_step:
            (chunk,) = output.chunks
            assert chunk.request is long and chunk.num_tokens <= 8
    # The long request starts its chunks while short ones keep being served in between.
    assert kinds == ["packed", "chunk", "packed", "chunk", "chunk"]
    assert long.num_computed_tokens == 20


def test_without_split_long_a_long_request_runs_whole_alone_in_one_step():
    """The vLLM backbone's scheduling: no cache is carried between steps, so no chunks."""
    scheduler = Scheduler(ValuationConfig(batch_tokens=8, max_seqs=4), split_long=False)
    long = request(20, name="long")
    shorts = [request(3) for _ in range(3)]
    for r in [long, *shorts]:
        scheduler.add(r)
    steps = []
    while scheduler.has_unfinished():
        output, _ = run_step(scheduler)
        steps.append([(c.request.sample.id, c.start, c.end) for c in output.chunks])
    assert steps == [[("n3", 0, 3), ("n3", 0, 3)], [("long", 0, 20)], [("n3", 0, 3)]]
    assert long.status is RequestStatus.FINISHED


def test_full_queue_is_refused():
    scheduler = Scheduler(ValuationConfig(max_waiting=2))
    scheduler.add(request(3))
    scheduler.add(request(3))
    with pytest.raises(QueueFull):
        scheduler.add(request(3))
    assert scheduler.num_waiting == 2


def test_priority_then_arrival():
    scheduler = Scheduler(ValuationConfig(batch_tokens=4, max_seqs=1, policy="priority"))
    low = [request(3, priority=5, name=f"low{i}") for i in range(3)]
    high = [request(3, priority=0, name=f"high{i}") for i in range(2)]
    for r in low + high:
        scheduler.add(r)
    assert [r.sample.id for r in run_all(scheduler)] == ["high0", "high1", "low0", "low1", "low2"]


def test_fcfs_ignores_priority():
    scheduler = Scheduler(ValuationConfig(batch_tokens=4, max_seqs=1))
    reqs = [request(3, priority=-i) for i in range(4)]
    for r in reqs:
        scheduler.add(r)
    assert run_all(scheduler) == reqs


def test_nothing_starves_under_a_stream_of_short_requests():
    # A request as large as the budget, and a long chunked one, both queued behind a stream
    # of short requests that keeps arriving: each still finishes within a few steps.
    scheduler = Scheduler(ValuationConfig(batch_tokens=8, max_seqs=8))
    scheduler.add(request(2))
    medium, long = request(8, name="medium"), request(30, name="long")
    scheduler.add(medium)
    scheduler.add(long)
    finished_at = {}
    for step in range(20):
        for _ in range(3):
            scheduler.add(request(2))
        for r in run_step(scheduler)[1]:
            finished_at[r.sample.id] = step
    assert finished_at["medium"] <= 2  # the head of the queue always fits an empty step
    assert finished_at["long"] <= 2 * 4  # 4 chunks, at least every other step


def test_cancel_frees_a_waiting_a_chunked_and_an_in_flight_request():
    scheduler = Scheduler(ValuationConfig(batch_tokens=4, max_seqs=4))
    waiting, chunked = request(3), request(10)
    scheduler.add(chunked)
    output = scheduler.schedule(0.0)  # the chunked request runs its first chunk
    chunked.kv_cache = "cache"
    settle(scheduler, output)
    scheduler.add(waiting)
    assert scheduler.cancel(waiting) and waiting.status is RequestStatus.CANCELLED
    assert scheduler.cancel(chunked) and chunked.kv_cache is None
    assert not scheduler.has_unfinished()
    assert not scheduler.cancel(chunked)  # already done

    in_flight = request(10)
    scheduler.add(in_flight)
    output = scheduler.schedule(0.0)
    in_flight.kv_cache = "cache"
    assert scheduler.cancel(in_flight)
    assert in_flight.kv_cache == "cache"  # the runner may still use it until the step is over
    assert settle(scheduler, output) == [] and in_flight.kv_cache is None
    assert not scheduler.has_unfinished()


def test_deadlines_expire_waiting_and_chunked_requests():
    scheduler = Scheduler(ValuationConfig(batch_tokens=4, max_seqs=1))
    soon = request(3, deadline=1.0)
    scheduler.add(soon)
    output = scheduler.schedule(2.0)
    assert output.expired == [soon] and not output.chunks and soon.status is RequestStatus.EXPIRED

    chunked = request(10, deadline=5.0)
    scheduler.add(chunked)
    output = scheduler.schedule(0.0)
    chunked.kv_cache = "cache"
    settle(scheduler, output)
    output = scheduler.schedule(6.0)
    assert output.expired == [chunked] and chunked.kv_cache is None
    assert not scheduler.has_unfinished()


operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(2, 40), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("step"), st.floats(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
), max_size=60)


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(2, 24), max_seqs=st.integers(1, 6), policy=st.sampled_from(["fcfs", "priority"]),
       ops=operations)
def test_budgets_hold_and_every_request_ends_exactly_once(budget, max_seqs, policy, ops):
    scheduler = Scheduler(ValuationConfig(batch_tokens=budget, max_seqs=max_seqs, policy=policy,
                                          max_waiting=20))
    admitted: list[Request] = []
    ended: dict[int, str] = {}
    now = 0.0

    def step():
        output = scheduler.schedule(now)
        assert output.num_tokens <= budget and len(output.chunks) <= max_seqs
        if output.is_chunk_step:
            assert len(output.chunks) == 1
        for chunk in output.chunks:
            # Chunks are contiguous: a request resumes exactly where it stopped.
            assert chunk.start == chunk.request.num_computed_tokens < chunk.end
            assert chunk.request.status is RequestStatus.RUNNING
        for r in output.expired:
            assert r.request_id not in ended
            ended[r.request_id] = "expired"
        for r in settle(scheduler, output):
            assert r.request_id not in ended and r.num_computed_tokens == r.num_tokens
            r.finish(RequestStatus.FINISHED)
            ended[r.request_id] = "finished"

    for op in ops:
        if op[0] == "add":
            _, length, priority, has_deadline = op
            r = request(length, priority=priority, deadline=now + 2 if has_deadline else None)
            try:
                scheduler.add(r)
                admitted.append(r)
            except QueueFull:
                assert scheduler.num_waiting == 20
        elif op[0] == "step":
            now += op[1]
            step()
        elif admitted:
            r = admitted[op[1] % len(admitted)]
            if scheduler.cancel(r):
                assert r.request_id not in ended
                ended[r.request_id] = "cancelled"
    for _ in range(10_000):
        if not scheduler.has_unfinished():
            break
        step()
    assert sorted(ended) == sorted(r.request_id for r in admitted)
    assert all(r.kv_cache is None and not r.partial_states for r in admitted)
