"""Where a process's wall time goes, sampled: put this directory first on PYTHONPATH and set QLORA_TIMELINE_DIR.

    QLORA_TIMELINE_DIR=/tmp/tl PYTHONPATH=$PWD/bench/timeline${PYTHONPATH:+:$PYTHONPATH} dvc repro   # gpu_pipeline.py --timeline

Every Python process started so (DVC and each stage it runs) samples its main thread's stack every 10 ms from a
thread of its own, and when it ends (normally, or through os._exit as the stages do) writes
<QLORA_TIMELINE_DIR>/<pid>.json: its command line, when the process started (the kernel's clock, so the
interpreter's own start-up counts), when it ended, and its time in consecutive segments by label:
- `import <package>`: the outermost module an `import` statement is executing (what it pulls in counts to it);
- otherwise the innermost function of this project (stages/ or qlora_pipeline), the library it called there and
  the function running (`evaluation.generate_answers > transformers > torch.nn.modules.module._call_impl`).
Unlike cProfile (bench/stage_profile.py), this does not slow the Python it measures (~1 % here), so its
figures are a plain run's; a sample is 10 ms, so a segment is known to about that.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time

INTERVAL_S = 0.01
OURS = ("/stages/", "/qlora_pipeline/")


def _process_start() -> float:
    """The process's start (epoch seconds), from the kernel's clock since boot: before the interpreter began."""
    with open("/proc/uptime") as fh:
        uptime, now = float(fh.read().split()[0]), time.time()
    with open("/proc/self/stat") as fh:
        ticks = float(fh.read().rsplit(")", 1)[1].split()[19])
    return now - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def _module(frame) -> str:
    return frame.f_globals.get("__name__") or "?"


def _ours(frame) -> bool:
    return any(mark in frame.f_code.co_filename for mark in OURS)


def _label(frame) -> str:
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    stack.reverse()   # outermost first
    if any(f.f_code.co_filename.startswith("<frozen importlib") for f in stack):
        for f in stack[1:]:
            if f.f_code.co_name == "<module>" and not _ours(f):
                return f"import {_module(f).split('.')[0]}"
    ours = [i for i, f in enumerate(stack) if _ours(f)]
    inner = stack[-1]
    where = f"{_module(inner)}.{inner.f_code.co_name}"
    if not ours:
        return where
    mine = stack[ours[-1]]
    name = f"{_module(mine).rsplit('.', 1)[-1]}.{mine.f_code.co_name}"
    below = stack[ours[-1] + 1:]
    return f"{name} > {_module(below[0]).split('.')[0]} > {where}" if below else name


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True, name="timeline-sampler")
        self.main, self.pid = threading.main_thread().ident, os.getpid()
        self.segments: list[list] = []   # [label, first sample, last sample]

    def run(self) -> None:
        while True:
            frame = sys._current_frames().get(self.main)
            now = time.time()
            label = _label(frame) if frame is not None else "?"
            if self.segments and self.segments[-1][0] == label:
                self.segments[-1][2] = now
            else:
                self.segments.append([label, now, now])
            del frame
            time.sleep(INTERVAL_S)


def _write(sampler: _Sampler, started: float) -> None:
    if getattr(_write, "done", False) or os.getpid() != sampler.pid:   # done, or a forked child (no sampler there)
        return
    _write.done = True
    ended = time.time()
    segments = [[label, round(first - started, 3), round(last - first + INTERVAL_S, 3)]
                for label, first, last in list(sampler.segments)]
    record = {"argv": sys.argv, "pid": os.getpid(), "started": started, "ended": ended, "segments": segments}
    try:
        with open(os.path.join(os.environ["QLORA_TIMELINE_DIR"], f"{os.getpid()}.json"), "w") as fh:
            json.dump(record, fh)
    except OSError as exc:   # a measurement that cannot be written must not change how the process ends
        print(f"timeline: not written ({exc})", file=sys.stderr)


def _install() -> None:
    sampler = _Sampler()
    started = _process_start()
    sampler.start()
    atexit.register(_write, sampler, started)
    exit_now = os._exit

    def _exit(status):   # the stages end with os._exit (entry.end_process): write first
        try:
            _write(sampler, started)
        finally:
            exit_now(status)

    os._exit = _exit


def _chain() -> None:
    """Run the sitecustomize this one shadows, if the environment has one."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("QLORA_TIMELINE_DIR"):
    _install()
_chain()
