"""The whole pipeline through DVC on the tiny profile: caching, and only what depends on a change reruns."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from helpers import (FAKE_HF_TOKEN, ROOT, copy_project, edit_params, make_project, reproducible_outputs, sh,
                     tiny_params, tool_env)

pytestmark = pytest.mark.slow


def stages_to_run(project):
    """Stages `dvc status` reports as changed."""
    status = json.loads(sh(project, "dvc", "status", "--json"))
    return sorted(status)


def reproduced_project(reproduced, tmp_path):
    """A copy of the shared reproduced tiny project (conftest.reproduced) and what its `dvc repro` printed."""
    project, out = reproduced
    return copy_project(project, tmp_path / "project"), out


def test_repro_then_change_one_param(reproduced, tmp_path):
    project, out = reproduced_project(reproduced, tmp_path)
    for stage in ("download@model", "download@data", "subset", "format", "tokenize", "quantize-inspect", "train", "merge", "evaluate"):
        assert f"Running stage '{stage}'" in out
    assert stages_to_run(project) == []

    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "first run")

    # Nothing changed: nothing reruns.
    again = sh(project, "dvc", "repro")
    assert "Running stage" not in again

    # Every stage rerun gives the same bytes (on the CPU; only wall-clock figures differ). Here evaluate
    # reruns; the other stages are rerun where a test runs them anyway: those before train in a fresh project
    # (test_killed_repro_resumes_training), train in test_stages.test_train_is_reproducible, merge in
    # test_repro_failures ("merged model missing": remade, the workspace is byte for byte as it was).
    first = reproducible_outputs(project)
    assert "Running stage 'evaluate'" in sh(project, "dvc", "repro", "--force", "--single-item", "evaluate")
    assert reproducible_outputs(project) == first
    assert json.loads(sh(project, "dvc", "status", "--json")) == {}

    # Only the learning rate changes: `dvc status` names the stage whose params changed (DVC judges a
    # stage by its own deps; merge and evaluate are stale once train's output changes), and a repro
    # reruns train, merge and evaluate, nothing upstream.
    edit_params(project, lambda params: params["train"].update(learning_rate=1e-3))
    assert stages_to_run(project) == ["train"]
    status = json.loads(sh(project, "dvc", "status", "--json"))
    assert status["train"] == [{"changed deps": {"params.yaml": {"train": "modified"}}}]
    diff = json.loads(sh(project, "dvc", "params", "diff", "--json"))
    assert diff == {"params.yaml": {"train.learning_rate": {"old": 0.0005, "new": 0.001, "diff": 0.0005}}}
    out = sh(project, "dvc", "repro")
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == [
        "Running stage 'train':", "Running stage 'merge':", "Running stage 'evaluate':"
    ]
    assert stages_to_run(project) == []

    # A change in the evaluate section reruns evaluate alone.
    edit_params(project, lambda params: params["evaluate"].update(max_new_tokens=4))
    assert stages_to_run(project) == ["evaluate"]

    metrics = json.loads(sh(project, "dvc", "metrics", "show", "--json"))
    assert metrics, "dvc metrics show found no metrics"

    check_plots_render(project, tmp_path)

    # Every command ran with a Hugging Face token in its environment: no file of the project, its git
    # history or its DVC cache holds it.
    for file in [p for p in project.rglob("*") if p.is_file()]:
        assert FAKE_HF_TOKEN.encode() not in file.read_bytes(), file


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OFFLINE_TEMPLATE = ROOT / "plots" / "offline.html"


def check_plots_render(project, tmp_path):
    """`dvc plots diff` of the committed run and the workspace (another learning rate), rendered by headless
    Chromium from the offline page: Vega draws each of the four plots (an SVG, Vega-Embed's default renderer,
    in each plot's element, with the lines or bars of the data; on an error vega-embed leaves the element
    without one)."""
    if not (CHROMIUM and OFFLINE_TEMPLATE.is_file()):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and plots/offline.html (.ci/run and setup.sh install them)")
        pytest.skip("chromium or plots/offline.html missing (apt-get install chromium; python plots/offline_template.py)")
    out = tmp_path / "plots"
    sh(project, "dvc", "plots", "diff", "HEAD", "--html-template", str(OFFLINE_TEMPLATE), "--out", str(out))
    page = (out / "index.html").read_text()
    for title in ("Loss per step", "Learning rate per step", "Exact match per task", "Memory by module type"):
        assert title in page
    assert "cdn.jsdelivr" not in page  # nothing to fetch: this machine has no network
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--dump-dom",
         (out / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = result.stdout
    for plot, mark in (("loss", "line mark"), ("learning_rate", "line mark"), ("exact_match_per_task", "bar"),
                       ("memory_by_module", "bar")):
        drawn = re.search(rf'<div id="{plot}" class="vega-embed[^"]*"><div class="chart-wrapper"[^>]*>'
                          r'<svg[^>]*? width="(\d+)" height="(\d+)".*?</svg>', dom, re.S)
        assert drawn and int(drawn[1]) > 200 and int(drawn[2]) > 150, f"{plot} not drawn:\n{dom[-3000:]}"
        assert f'aria-roledescription="{mark}" d="M' in drawn[0], f"{plot}: no {mark} drawn:\n{drawn[0][-3000:]}"


def test_experiments_reuse_the_cache_and_compare(reproduced, tmp_path):
    """`dvc exp run -S` reruns only what the changed params reach; a queued sweep runs with `dvc queue start`."""
    import time

    project, _ = reproduced_project(reproduced, tmp_path)
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")

    out = sh(project, "dvc", "exp", "run", "-n", "lr-high", "-S", "train.learning_rate=0.002", "-S", "lora.r=4")
    ran = [line for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'quantize-inspect':", "Running stage 'train':", "Running stage 'merge':",
                   "Running stage 'evaluate':"]

    # The sweep is over a param of the last stage alone, so each queued experiment (run by a queue worker in a
    # copy of the repository under .dvc/tmp/exps) reruns evaluate only; the reach of training params is
    # checked with lr-high above and in test_repro_then_change_one_param.
    for name, tokens in (("sweep-a", "4"), ("sweep-b", "6")):
        sh(project, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"evaluate.max_new_tokens={tokens}")
    sh(project, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh(project, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(0.5)
    assert "Failed" not in status, status
    for name in ("sweep-a", "sweep-b"):
        log = sh(project, "dvc", "queue", "logs", name)
        assert [line for line in log.splitlines() if line.startswith("Running stage")] == [
            "Running stage 'evaluate':"], log[-2000:]
    shown = json.loads(sh(project, "dvc", "exp", "show", "--json"))
    names = {exp.get("name") for commit in shown for exp in (commit.get("experiments") or [])}
    assert {"lr-high", "sweep-a", "sweep-b"} <= names, names
    diff = json.loads(sh(project, "dvc", "params", "diff", "HEAD", "lr-high", "--json"))
    assert diff["params.yaml"]["lora.r"] == {"old": 8, "new": 4, "diff": -4}
    metrics = json.loads(sh(project, "dvc", "metrics", "diff", "HEAD", "lr-high", "--json"))
    assert "metrics/eval.json" in metrics and "metrics/train.json" in metrics


def outputs_before_train(project):
    """reproducible_outputs of the stages that run before train (their outs in dvc.lock)."""
    stages = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    outs = [out["path"] for name, stage in stages.items() if name not in ("train", "merge", "evaluate")
            for out in stage["outs"]]
    assert "data/tokenized" in outs and "models/base" in outs, outs
    return {key: value for key, value in reproducible_outputs(project).items()
            if any(key == out or key.startswith(f"{out}/") for out in outs)}


def test_killed_repro_resumes_training(reproduced, tmp_path):
    """SIGKILL to the whole `dvc repro` mid-training; the next `dvc repro` continues from the checkpoint. The
    stages before train, run from scratch in this new project (only train's params differ), give the bytes
    they gave in the reproduced project."""
    import signal
    import time

    params = tiny_params(train={"max_steps": 6, "checkpoint_every_steps": 2})
    project = make_project(tmp_path / "project", params)
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    repro = subprocess.Popen(["dvc", "repro"], cwd=project, env=tool_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = project / "checkpoints/train/checkpoint-2/pipeline_state.json"
    while not marker.exists():
        assert repro.poll() is None, "dvc repro finished before it could be killed"
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()

    result = subprocess.run(["dvc", "repro"], cwd=project, env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = [line for line in result.stdout.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'train':", "Running stage 'merge':", "Running stage 'evaluate':"]
    assert "resuming from checkpoints/train/checkpoint-" in result.stderr
    assert json.loads((project / "metrics/train.json").read_text())["resumed_from_step"] >= 2
    assert stages_to_run(project) == []
    assert outputs_before_train(project) == outputs_before_train(reproduced[0])
