"""What every stage script starts with (`import entry`, first) and ends with (`entry.run(main, ...)`).

Importing this module puts the src/ beside this script first on sys.path, so a stage runs the library of the
checkout it belongs to. `dvc exp run --queue` / `--temp` runs each experiment in a copy of the repository
(.dvc/tmp/exps/...), while the editable install points at the main workspace's src/: without this, an
experiment that changes library code would run the workspace's code, and its dvc.lock would record the
hashes of code that did not run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

# A model stage imports torch, transformers and peft: ~460,000 objects that live as long as the process. At the
# default threshold (a young collection every 700 allocations) the cyclic collector makes ~1,000 young and 7 full
# passes over them while they load, a fifth of the import time (0.9 of 4.6 s on a 2-core CPU, measured). Every
# 10,000 allocations leaves no full pass during the imports and still collects cyclic garbage.
gc.set_threshold(10_000, 10, 10)


class _CompileOnFirstCallWhileImporting(importlib.abc.MetaPathFinder):
    """While bitsandbytes is first imported (by whichever library asks for it first), torch.compile(fn) gives a
    function that calls torch.compile(fn) the first time it is called, then what that returned.

    Why: bitsandbytes decorates its CPU fallback kernels with torch.compile when imported, and torch.compile
    imports its whole compiler (torch._inductor) before it returns: ~1 s of each model stage's start-up on a
    2-core CPU, 1 to 2 s on a GPU machine (bench/NOTES.md), for kernels a GPU run never calls. torch.compile
    compiles on the first call anyway, so what runs and when it is compiled stay the same; only the compiler's
    import moves to that call. The finder stays until bitsandbytes' code runs: libraries look it up first only
    to see whether it is installed (importlib.util.find_spec)."""

    def __init__(self):
        self.looking = False

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes" or self.looking:
            return None
        self.looking = True   # the lookup below asks the finders again, this one too
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.looking = False
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderCompilingOnFirstCall(spec.loader, self)
        return spec


class _LoaderCompilingOnFirstCall(importlib.abc.Loader):
    """bitsandbytes' own loader, its module executed with torch.compile made lazy (above)."""

    def __init__(self, loader, finder):
        self.loader, self.finder = loader, finder

    def __getattr__(self, name):   # resources, is_package, ...: the loader's own
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import torch

        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        compile_now = torch.compile
        torch.compile = _compile_on_first_call(compile_now)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = compile_now


def _compile_on_first_call(compile_now: Callable) -> Callable:
    def compile_later(model=None, **options):
        if model is None:   # used as @torch.compile(dynamic=False)
            return functools.partial(compile_later, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                try:
                    compiled = compile_now(model, **options)
                except Exception:   # where torch.compile itself fails, the function runs as it is, from now on
                    compiled = model
            return compiled(*args, **kwargs)

        return call

    return compile_later


if "bitsandbytes" not in sys.modules:
    sys.meta_path.insert(0, _CompileOnFirstCallWhileImporting())


def run(main: Callable[..., None], doc: str, writes: Sequence[str | Path] = (), *, params_option: bool = False,
        options: Mapping[str, Mapping[str, Any]] | None = None, **choices: Mapping[str, Sequence[str | Path]]) -> None:
    """Run `main` as the stage: parse its command line (`doc`'s first line is the --help), refuse outputs it
    cannot replace before any work, and stop on bad input with one line and exit status 2 (errors.run_stage).

    writes: the stage's outputs, as dvc.yaml lists them.
    choices: NAME={choice: the outputs it writes}, a positional argument, passed to `main` as NAME.
    params_option: a --params FILE option, passed as params_path (for a stage that relaunches itself).
    options: further options, {flag: argparse.add_argument keywords}, passed to `main` by their dest.
    """
    from qlora_pipeline.errors import run_stage
    from qlora_pipeline.outputs import refuse_links

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, outputs in choices.items():
        parser.add_argument(name, choices=list(outputs))
    if params_option:
        parser.add_argument("--params", dest="params_path", default="params.yaml")
    for flag, keywords in (options or {}).items():
        parser.add_argument(flag, **keywords)
    args = vars(parser.parse_args())
    outputs = [*writes, *(path for name, per_choice in choices.items() for path in per_choice[args[name]])]

    def stage() -> None:
        refuse_links(*outputs)
        main(**args)

    run_stage(stage)
    # Done: every output is written, closed and renamed into place. Tearing down the interpreter after a model
    # stage takes longer than some stages' work (~1.3 s to free what torch, transformers and peft imported, on a
    # 2-core CPU, measured), and nothing is left for it to do: the libraries' exit handlers would only free memory.
    end_process()


def end_process() -> None:
    """Exit with status 0 at once, without the interpreter's teardown; what was printed is flushed first (by
    Python, and by C libraries that print through stdio, such as NCCL's debug lines)."""
    import ctypes
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask: nothing printed through it
        pass
    os._exit(0)
