"""A failed `dvc repro` or `dvc exp run` leaves every file of the workspace byte for byte as it was.

Each case of test_bad_input.py (one thing wrong: params, a data file, a model source, an output) runs
through `dvc repro` on a copy of the reproduced tiny project, and so do a crash (an exception inside a stage)
and a kill (SIGKILL to the whole `dvc repro` mid-stage); one case of each kind runs through `dvc exp run`.
The check is every file, folder and link of the project, DVC's cache included, except:
- .git: `dvc exp run` records each experiment (and its queue) as git refs and objects; a tracked file the
  workspace holds is still compared as a file.
- .dvc/tmp: DVC's own locks and state, rewritten by every dvc command.
- __pycache__: Python's bytecode, written by whichever import first reads a module.
"""

import hashlib
import os
import signal
import subprocess
import time

import pytest
import torch

from helpers import copy_project, edit_params, sh, tool_env
from test_bad_input import CASES

pytestmark = pytest.mark.slow

SKIPPED = (".git", ".dvc/tmp")


def workspace(project):
    """Every folder, file and link under `project` (but SKIPPED and __pycache__): a file by the sha256 of
    its bytes, a link by where it points."""
    found = {}
    for folder, dirs, files in os.walk(project):
        here = os.path.relpath(folder, project)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.normpath(os.path.join(here, d)) not in SKIPPED)
        found[here] = "folder"
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.normpath(os.path.join(here, name))
            if os.path.islink(path):
                found[key] = f"link to {os.readlink(path)}"
            elif name in files:
                with open(path, "rb") as fh:
                    found[key] = hashlib.sha256(fh.read()).hexdigest()
    return found


def changes(before, after):
    """What differs, as a short list for an assertion message."""
    return sorted(f"{'changed' if k in before and k in after else 'removed' if k in before else 'added'}: {k}"
                  for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def dvc(project, *args):
    return subprocess.run(["dvc", *args], cwd=project, env=tool_env(), capture_output=True, text=True)


# How `dvc repro` meets the cases that are not a failure of its own:
# - a damaged or missing output with its inputs intact: it reruns the stage that makes it, and the workspace
#   is again what it was before the damage (the pipeline is deterministic; for merge, this is the rerun
#   check test_pipeline.test_repro_then_change_one_param counts on);
# - an output replaced by a link to the same bytes: nothing changed for DVC, nothing runs.
REPAIRED = {"damaged base weights", "upstream output missing", "merged model missing"}
UP_TO_DATE = {"output folder is a link", "metrics file is a link"}
# Bad params that DVC itself refuses, before any stage runs, with its own message.
REFUSED_BY_DVC = {"misspelled section": "Parameters 'lora' are missing from 'params.yaml'",
                  "not YAML": "unable to read: 'params.yaml', YAML file structure is corrupted"}


def assert_failed_cleanly(result, before, after, *messages):
    """`dvc` failed, said so with each of `messages`, and left the workspace as it was."""
    assert result.returncode != 0, result.stdout[-2000:]
    for message in messages:
        assert message in result.stderr, result.stderr[-2000:]
    assert after == before, changes(before, after)


@pytest.mark.parametrize("case", CASES)
def test_failed_repro_leaves_the_workspace(ran, tmp_path, case):
    setup, _, start, detail = CASES[case]
    if case == "GPU demanded, none present" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    project = copy_project(ran, tmp_path / "project")
    pristine = workspace(project)
    setup(project, tmp_path)
    before = workspace(project)
    result = dvc(project, "repro")
    after = workspace(project)
    if case in REPAIRED:
        assert result.returncode == 0, result.stderr[-2000:]
        assert after == pristine, changes(pristine, after)
    elif case in UP_TO_DATE:
        assert result.returncode == 0 and "Data and pipelines are up to date." in result.stdout, result.stdout[-2000:]
        assert after == before, changes(before, after)
    elif case in REFUSED_BY_DVC:
        assert_failed_cleanly(result, before, after, REFUSED_BY_DVC[case])
    else:
        assert_failed_cleanly(result, before, after, start, detail)
        assert "Traceback" not in result.stderr, result.stderr[-2000:]


# What a crash inside evaluate replaces (injected at the top of its script), early or late in the stage.
AFTER_LOAD_PARAMS = "paths.require"                # before any model is read
AFTER_EVALUATING = "reports.per_task_csv"          # every figure and sample computed, the reports being formatted


def crash_in_evaluate(project, where):
    """evaluate reruns with one sample fewer (so that any output it wrote would differ) and raises an exception
    in place of the library function `where`, as a bug there would."""
    edit_params(project, lambda p: p["evaluate"].update(generate_rows=p["evaluate"]["generate_rows"] - 1))
    module, function = where.split(".")
    crash = (f"import qlora_pipeline.{module}\n\n\n"
             "def _injected_crash(*args, **kwargs):\n    raise RuntimeError('injected crash')\n\n\n"
             f"qlora_pipeline.{module}.{function} = _injected_crash\n\n\n")
    script = project / "stages/evaluate.py"
    text = script.read_text()
    assert text.count("\ndef main(") == 1
    script.write_text(text.replace("\ndef main(", "\n" + crash + "def main("))


def merge_to_rerun(project):
    """merge reruns and compares one prompt more: its metrics, were they written, would differ."""
    edit_params(project, lambda p: p["merge"].update(compare_prompts=p["merge"]["compare_prompts"] + 1))


def kill_mid_merge(project, command):
    """Run `command`, SIGKILL its whole process group once the merge stage has started writing its model (its
    temporary folder appeared), and wait for it."""
    run = subprocess.Popen(command, cwd=project, env=tool_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list((project / "models").glob(".merged.tmp-*")):
        assert run.poll() is None, f"{' '.join(command)} ended before it could be killed"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def assert_killed_cleanly(before, after):
    """Every entry the workspace held is as it was; what the kill left is the stage's temporary folder
    (removed by the stage's next run: test_outputs.py)."""
    left = {key for key in after.keys() - before.keys() if key.startswith("models/.merged.tmp-")}
    assert {key: value for key, value in after.items() if key not in left} == before, changes(before, after)


def test_crash_inside_a_stage_leaves_the_workspace(ran, tmp_path):
    project = copy_project(ran, tmp_path / "project")
    crash_in_evaluate(project, AFTER_EVALUATING)
    before = workspace(project)
    result = dvc(project, "repro")
    assert_failed_cleanly(result, before, workspace(project), "RuntimeError: injected crash")


def test_killed_repro_leaves_the_workspace(ran, tmp_path):
    project = copy_project(ran, tmp_path / "project")
    merge_to_rerun(project)
    before = workspace(project)
    kill_mid_merge(project, ["dvc", "repro"])
    assert_killed_cleanly(before, workspace(project))


# One case of each kind through `dvc exp run` in the workspace: bad params, a bad data file, a bad model
# source, a crash, a kill. (A queued experiment runs in a copy under .dvc/tmp/exps: the workspace is not
# touched whatever happens there.)
EXP_CASES = ["out of range", "malformed JSONL", "model without weights", "crash", "kill"]


@pytest.mark.parametrize("case", EXP_CASES)
def test_failed_exp_run_leaves_the_workspace(ran, tmp_path, case):
    project = copy_project(ran, tmp_path / "project")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    if case == "kill":
        merge_to_rerun(project)
        before = workspace(project)
        kill_mid_merge(project, ["dvc", "exp", "run"])
        assert_killed_cleanly(before, workspace(project))
        return
    if case == "crash":
        crash_in_evaluate(project, AFTER_LOAD_PARAMS)
        messages = ["RuntimeError: injected crash"]
    else:
        setup, _, *messages = CASES[case]
        setup(project, tmp_path)
    before = workspace(project)
    result = dvc(project, "exp", "run")
    assert_failed_cleanly(result, before, workspace(project), *messages)
