"""bench.timeline on a hand-made trace: which idle gaps were the host's, and what it was doing."""

from bench.timeline import host_syncs, idle_gaps, summarize


def kernel(ts, dur, correlation):
    return {"ph": "X", "cat": "kernel", "name": f"k{correlation}", "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def launch(ts, correlation, tid=1):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2, "tid": tid,
            "args": {"correlation": correlation}}


def op(name, ts, dur, tid=1, cat="cpu_op"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


TRACE = {"traceEvents": [
    op("step:forward", 0, 100, cat="user_annotation"),
    op("step:backward", 100, 100, cat="user_annotation"),
    # forward: k1 launched early; k2 launched at 40, after the GPU went idle at 30: 10 us the host's
    op("aten::mm", 0, 5), launch(1, 1), kernel(10, 20, 1),
    op("faster_qat::quantized_linear", 35, 10), op("aten::_scaled_mm", 38, 5), launch(40, 2), kernel(40, 10, 2),
    # k3 was queued long before the GPU freed up: a 20 us gap that is no host's (a dependency)
    launch(45, 3), kernel(70, 10, 3),
    # backward on autograd's thread: k4 launched at 130, the GPU idle since 80
    op("autograd::engine", 100, 90, tid=7), op("aten::copy_", 125, 10, tid=7), launch(130, 4, tid=7),
    kernel(132, 10, 4),
    # overlapping kernels on two streams are one busy stretch
    launch(131, 5, tid=7), kernel(135, 20, 5),
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 160, "dur": 3000, "tid": 1, "args": {}},
]}


def test_gaps_are_charged_to_the_late_launch_and_its_phase():
    gaps, busy, window = idle_gaps(TRACE)
    assert [(g.start_us, g.end_us, g.host_bound, g.op, g.phase) for g in gaps] == [
        (30, 40, True, "aten::_scaled_mm", "step:forward"),
        (50, 70, False, "", "step:forward"),
        (80, 132, True, "aten::copy_", "step:forward"),
    ]
    assert busy == 20 + 10 + 10 + 23 and window == 145


def test_summary_adds_up_by_phase_thread_and_op():
    summary = summarize(*idle_gaps(TRACE))
    assert summary["idle_ms"] == 0.082 and summary["host_bound_idle_ms"] == 0.062
    assert summary["by_phase_ms"]["step:forward"] == {"idle": 0.082, "host_bound": 0.062}
    assert summary["by_thread_ms"] == {"7": 0.052, "1": 0.01}
    assert summary["host_bound_by_op"][0] == {"op": "aten::copy_", "ms": 0.052, "gaps": 1}
    assert host_syncs(TRACE) == {"cudaStreamSynchronize": {"count": 1, "ms": 3.0}}
