"""A train stage killed with SIGKILL resumes from its last checkpoint and ends exactly where an
uninterrupted run ends (on the CPU: the same adapter bytes, the same step log and metrics but time)."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import copy_project, edit_params, project_with_inputs, run_stage, tiny_params, tool_env

# The tiny profile's 16 train rows, 4 rows a step: 4 steps an epoch, 6 steps, checkpoints after steps 3 and 6;
# step 3 is mid-epoch and the resumed run goes on into the second epoch, so resuming must restore the data
# order and RNG state, not only the weights.
RESUME_PARAMS = tiny_params(
    train={"max_steps": 6, "batch_size": 2, "grad_accum": 2, "checkpoint_every_steps": 3, "eval_every_steps": 2},
)
TIMING_KEYS = {"runtime_s", "real_tokens_per_s", "peak_memory_mb", "resumed_from_step"}


@pytest.fixture(scope="module")
def tokenized(ran, tmp_path_factory):
    """The resume project with every stage before train done: only train's params differ from the tiny
    project's, so those stages' outputs are the reproduced project's. Tests train in copies of it."""
    return project_with_inputs(ran, tmp_path_factory.mktemp("tokenized") / "project", RESUME_PARAMS,
                               ("models/base", "data/formatted", "data/tokenized"))


def kill_train_after(project, step):
    """Start the train stage and SIGKILL it as soon as the checkpoint of `step` is complete."""
    proc = subprocess.Popen([sys.executable, "stages/train.py"], cwd=project, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = project / f"checkpoints/train/checkpoint-{step}/pipeline_state.json"
    while not marker.exists():
        assert proc.poll() is None, "the stage finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def step_log(project):
    with open(project / "metrics/train_log.csv") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def train_metrics(project):
    metrics = json.loads((project / "metrics/train.json").read_text())
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def uninterrupted(tokenized, tmp_path_factory):
    project = copy_project(tokenized, tmp_path_factory.mktemp("uninterrupted") / "project")
    run_stage(project, "train.py")
    return project


@pytest.fixture(scope="module")
def killed(tokenized, tmp_path_factory):
    """The resume project after its train stage was killed once the checkpoint of step 3 was complete; tests
    go on in copies of it."""
    project = copy_project(tokenized, tmp_path_factory.mktemp("killed") / "project")
    kill_train_after(project, 3)
    return project


def test_killed_train_resumes_to_the_same_adapter(killed, uninterrupted, tmp_path):
    project = copy_project(killed, tmp_path / "project")
    checkpoints = project / "checkpoints/train"
    assert not (project / "models/adapter").exists()
    assert json.loads((checkpoints / "run.json").read_text())["status"] == "running"
    # A checkpoint cut off while being written (no pipeline_state.json) must be ignored.
    torn = checkpoints / "checkpoint-5"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 100)

    started = time.perf_counter()
    result = run_stage(project, "train.py")
    resumed_seconds = time.perf_counter() - started
    assert "resuming from checkpoints/train/checkpoint-3" in result.stderr

    adapter = "models/adapter/adapter_model.safetensors"
    assert (project / adapter).read_bytes() == (uninterrupted / adapter).read_bytes()
    assert step_log(project) == step_log(uninterrupted)
    live = "dvclive/train/plots/metrics"
    for name in ("train/loss.tsv", "eval/loss.tsv", "train/tokens.tsv"):
        assert (project / live / name).read_bytes() == (uninterrupted / live / name).read_bytes()
    assert train_metrics(project) == train_metrics(uninterrupted)
    assert json.loads((project / "metrics/train.json").read_text())["resumed_from_step"] == 3
    # Done: only the record of the completed run is left, the same as after an uninterrupted run.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run.json"]
    assert (checkpoints / "run.json").read_bytes() == (uninterrupted / "checkpoints/train/run.json").read_bytes()
    print(f"resumed run: {resumed_seconds:.1f} s")


def test_killed_after_its_last_checkpoint_resumes_to_no_more_steps(tokenized, uninterrupted, tmp_path):
    """Cut off between the checkpoint of its last step and its outputs, the run resumes there with no step left:
    the uninterrupted run's adapter and step log (the Trainer alone would train a step past max_steps)."""
    project = copy_project(tokenized, tmp_path / "project")
    kill_train_after(project, 6)
    assert not (project / "models/adapter").exists()
    run_stage(project, "train.py")
    metrics = json.loads((project / "metrics/train.json").read_text())
    assert (metrics["steps"], metrics["resumed_from_step"]) == (6, 6)
    assert step_log(project) == step_log(uninterrupted)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (project / "models/adapter" / name).read_bytes() == (uninterrupted / "models/adapter" / name).read_bytes()


def test_checkpoint_of_other_params_is_refused(killed, tmp_path):
    project = copy_project(killed, tmp_path / "project")
    before = sorted(p.relative_to(project) for p in (project / "checkpoints").rglob("*"))

    edit_params(project, lambda params: params["train"].update(learning_rate=1e-3))
    result = run_stage(project, "train.py", check=False)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: checkpoints/train/checkpoint-3 is from another run")
    assert "'train.learning_rate' was 0.0005, is now 0.001" in message and "delete checkpoints/train" in message
    assert sorted(p.relative_to(project) for p in (project / "checkpoints").rglob("*")) == before
    assert not (project / "models/adapter").exists()

    # A param that changes neither arithmetic nor data order may differ: the run resumes.
    edit_params(project, lambda params: params["train"].update(learning_rate=5e-4, log_every_steps=2))
    assert "resuming from checkpoints/train/checkpoint-3" in run_stage(project, "train.py").stderr


def test_changed_data_makes_a_checkpoint_foreign(killed, tmp_path):
    project = copy_project(killed, tmp_path / "project")
    edit_params(project, lambda params: params["tokenize"].update(train_on="all"))
    run_stage(project, "tokenize_data.py")
    result = run_stage(project, "train.py", check=False)
    assert result.returncode == 2
    assert "is from another run (tokenized_data has changed)" in result.stderr
