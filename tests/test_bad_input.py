"""Bad input, stage by stage: each case runs a stage script on a finished tiny project with one thing
wrong, and checks that it stops with exit status 2 and one line naming the problem and where it is,
and that every existing output is left byte for byte as it was.

More cases, checked in-process, are in test_config.py (params), test_data.py (data files),
test_stages.py (sources, micro-batches) and test_resume.py (foreign checkpoints)."""

import resource
import shutil
from pathlib import Path

import pytest
import torch

from helpers import copy_project, edit_params, run_stage

OUTPUTS = ("models", "data", "metrics", "reports", "checkpoints")


def data_file(content, suffix=".jsonl"):
    """Use a local data file with `content` as the data source."""
    def setup(project, tmp):
        path = tmp / f"rows{suffix}"
        path.write_text(content)
        edit_params(project, lambda p: p["data"].update(source="local", name=str(path)))
    return setup


def model_dir(mutate):
    """Use a local copy of the tiny base model, changed by `mutate`, as the model source."""
    def setup(project, tmp):
        path = tmp / "model"
        shutil.copytree(project / "models/base", path)
        mutate(path)
        edit_params(project, lambda p: p["model"].update(source="local", name=str(path)))
    return setup


def remove(*names):
    def mutate(path):
        for name in names:
            (path / name).unlink()
    return mutate


def edit(dotted, value=None, delete=False):
    def setup(project, tmp):
        section, key = dotted.split(".")
        edit_params(project, lambda p: p[section].pop(key) if delete else p[section].__setitem__(key, value))
    return setup


def cut_end(relative, size):
    """Drop the last `size` bytes of a file, as an interrupted copy would."""
    def setup(project, tmp):
        path = project / relative
        path.write_bytes(path.read_bytes()[:-size])
    return setup


def delete_output(relative):
    def setup(project, tmp):
        shutil.rmtree(project / relative)
    return setup


def link_output(relative):
    """Move an output elsewhere and leave a symbolic link in its place, as a user saving disk space might."""
    def setup(project, tmp):
        moved = tmp / "elsewhere" / Path(relative).name
        moved.parent.mkdir()
        (project / relative).rename(moved)
        (project / relative).symlink_to(moved)
    return setup


def write_params(text):
    def setup(project, tmp):
        (project / "params.yaml").write_text(text)
    return setup


ROW = '{"instruction": "Say hi.", "input": "", "output": "hi"}\n'

# id -> (setup, stage script and args, the start of the one-line message, a part of it)
CASES = {
    # params
    "misspelled key": (edit("train.learnig_rate", 1e-4), ("train.py",), "error: params key 'train.learnig_rate' is unknown", "known: "),
    "misspelled section": (lambda p, t: edit_params(p, lambda d: d.update(lorra=d.pop("lora"))), ("train.py",), "error: params key 'lorra' is unknown", ""),
    "missing key": (edit("evaluate.batch_size", delete=True), ("evaluate.py",), "error: params key 'evaluate.batch_size' is missing", ""),
    "wrong type": (edit("lora.r", "eight"), ("train.py",), "error: params key 'lora.r': expected int, got 'eight'", ""),
    "bool for int": (edit("train.batch_size", True), ("train.py",), "error: params key 'train.batch_size': expected int", ""),
    "out of range": (edit("train.warmup_ratio", 1.5), ("train.py",), "error: params key 'train.warmup_ratio': must be in [0, 1)", ""),
    "unknown choice": (edit("quantize.quant_type", "int3"), ("quantize_inspect.py",), "error: params key 'quantize.quant_type': expected 'nf4' | 'fp4'", ""),
    "not YAML": (write_params("seed: 1\ntrain: [oops\n"), ("subset.py",), "error: params.yaml line", "not valid YAML"),
    "too many rows asked": (edit("subset.train_size", 5000), ("subset.py",), "error: params key 'subset.train_size'", ""),
    "seed over 32 bits": (lambda p, t: edit_params(p, lambda d: d.update(seed=2**32)), ("subset.py",), "error: params key 'seed': must be in [0, 2**32)", ""),
    "remote code asked": (edit("model.trust_remote_code", True), ("download.py", "model"), "error: params key 'model.trust_remote_code': must be false", ""),
    # lengths past the tiny model's context (n_positions 512): refused before they fail deep in a later stage
    "rows longer than the context": (edit("tokenize.max_length", 600), ("tokenize_data.py",), "error: params key 'tokenize.max_length': rows of up to 600 tokens, more than the model's context of 512 positions (n_positions in models/base/config.json)", ""),
    "generation longer than the context": (edit("evaluate.max_new_tokens", 600), ("evaluate.py",), "error: params key 'evaluate.max_new_tokens': generating 600 tokens, more than the model's context of 512", ""),
    "prompt + generation over the context": (edit("evaluate.max_new_tokens", 480), ("evaluate.py",), "error: params key 'evaluate.max_new_tokens': generating after the prompt of data/formatted/eval.jsonl row 1 (", "more than the model's context of 512"),
    # data files
    "empty data file": (data_file(""), ("download.py", "data"), "error: ", "rows.jsonl: no rows"),
    "malformed JSONL": (data_file(ROW + "{oops\n"), ("download.py", "data"), "error: ", "rows.jsonl line 2: not valid JSON"),
    "malformed JSON": (data_file("[" + ROW.strip() + ",", ".json"), ("download.py", "data"), "error: ", "rows.json line 1: not valid JSON"),
    "missing field": (data_file(ROW + '{"instruction": "x"}\n'), ("download.py", "data"), "error: ", "rows.jsonl row 2: missing column 'output'"),
    "non-string field": (data_file(ROW + '{"instruction": "x", "output": 42}\n'), ("download.py", "data"), "error: ", "rows.jsonl row 2: column 'output' must be text, got int"),
    "empty answer": (data_file(ROW + '{"instruction": "x", "output": " "}\n'), ("download.py", "data"), "error: ", "rows.jsonl row 2: empty output"),
    "duplicate rows": (data_file(ROW + '{"instruction": "x", "output": "y"}\n' + ROW), ("download.py", "data"), "error: ", "rows.jsonl row 3 repeats row 1 (same instruction, input and output)"),
    "missing data file": (edit("data.source", "local"), ("download.py", "data"), "error: params key 'data.name': local data file tasks does not exist", ""),
    # model sources
    "model without weights": (model_dir(remove("model.safetensors")), ("download.py", "model"), "error: model directory", "no weights (no *.safetensors file)"),
    "model without tokenizer": (model_dir(remove("tokenizer.json", "tokenizer_config.json")), ("download.py", "model"), "error: model directory", "no tokenizer files"),
    "model without config": (model_dir(remove("config.json")), ("download.py", "model"), "error: model directory", "no config.json"),
    "hub model not cached offline": (edit("model.source", "hub"), ("download.py", "model"), "error: params key 'model.name': cannot get model 'tiny-gpt2'", ""),
    "damaged base weights": (cut_end("models/base/model.safetensors", 100), ("train.py",), "error: models/base/model.safetensors: damaged safetensors file", ""),
    # the pipeline's own inputs and the environment
    "upstream output missing": (delete_output("data/tokenized"), ("train.py",), "error: data/tokenized: not found; stage tokenize makes it: dvc repro tokenize", ""),
    "merged model missing": (delete_output("models/merged"), ("evaluate.py",), "error: models/merged: not found; stage merge makes it", ""),
    # outputs a stage cannot replace: refused before any work, the model of the same stage untouched too
    "output folder is a link": (link_output("models/merged"), ("merge.py",), "error: models/merged: the output is a symbolic link", ""),
    "metrics file is a link": (link_output("metrics/merge.json"), ("merge.py",), "error: metrics/merge.json: the output is a symbolic link", ""),
    "GPU demanded, none present": (edit("train.device", "cuda"), ("train.py",), "error: params key 'train.device' is 'cuda' but no CUDA GPU is available", ""),
}


def snapshot(project):
    return {p.relative_to(project): p.read_bytes() for name in OUTPUTS for p in (project / name).rglob("*") if p.is_file()}


def stage_in_copy(ran, tmp_path, setup):
    project = copy_project(ran, tmp_path / "project")
    setup(project, tmp_path)
    return project


@pytest.mark.parametrize("case", CASES)
def test_bad_input_stops_cleanly(ran, tmp_path, case):
    setup, command, start, detail = CASES[case]
    if case == "GPU demanded, none present" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    project = stage_in_copy(ran, tmp_path, setup)
    before = snapshot(project)
    result = run_stage(project, *command, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(start) and detail in last, last
    assert "Traceback" not in result.stderr
    assert snapshot(project) == before
    assert not list(project.glob("**/.*.tmp-*")) + list(project.glob("**/.*.old-*")), "temporary files left behind"


def test_full_disk_leaves_the_previous_outputs(ran, tmp_path):
    """A write that fails for lack of space (simulated with a 64 KiB file size limit) stops the stage
    with one line; the model it was replacing is untouched and no temporary files are left."""
    project = stage_in_copy(ran, tmp_path, lambda p, t: None)
    before = snapshot(project)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = run_stage(project, "merge.py", check=False, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left to write") and "File too large" in last, last
    assert snapshot(project) == before
    assert not list(project.glob("**/.*.tmp-*"))

