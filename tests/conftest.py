"""Shared fixtures: a throw-away copy of the project, the tiny project after one `dvc repro`, a tiny model on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One CPU thread for torch, in this process and in every stage and tool the tests start (they inherit the
# environment; set before anything imports torch). The tiny models' operations are too small to gain from more:
# the threads spin waiting for each other, worst on a machine shared with other work (the tiny project's
# evaluate stage on the 2-core CI machine under load: 7.5-10.8 s with one thread, 14-19 s with two). The tiny
# project's train, merge and evaluate outputs are the same bytes either way. torchrun does the same for the
# processes it starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The plain helpers live in helpers.py; these names stay importable from conftest for the tests that still
# import them from here.
from helpers import (  # noqa: F401
    FAKE_HF_TOKEN, ROOT, TINY_OVERLAY, copy_project, default_params, edit_params, make_project, run_stage, sh,
    tiny_params, tool_env,
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project", tiny_params())


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """The tiny project as a git + DVC repo after one `dvc repro` (nothing committed), and what the repro
    printed. Shared by every test that needs a finished project: they copy it (copy_project), never change it."""
    project = make_project(tmp_path_factory.mktemp("reproduced") / "project", tiny_params())
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    sh(project, "dvc", "config", "core.autostage", "false")
    return project, sh(project, "dvc", "repro")


@pytest.fixture(scope="session")
def ran(reproduced) -> Path:
    """The tiny project after every stage ran once, in order (through `dvc repro`)."""
    return reproduced[0]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved random tiny-gpt2 with its byte-level tokenizer."""
    from qlora_pipeline.config import ModelParams
    from qlora_pipeline.sources import fetch_model

    out = tmp_path_factory.mktemp("tiny-gpt2")
    fetch_model(ModelParams("random", "tiny-gpt2", "main", False, False), 0, out)
    return out
