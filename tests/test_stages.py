"""Each stage script, in pipeline order, on the tiny profile (random 2-layer GPT-2, 16 rows, 2 steps)."""

import json
import math
import shutil

import pytest

from helpers import FAKE_HF_TOKEN, make_project, project_with_inputs, reproducible_outputs, run_stage, tiny_params


def read_json(path):
    return json.loads(path.read_text())


def test_download(ran):
    base = ran / "models/base"
    assert (base / "model.safetensors").is_file() and not list(base.glob("*.bin"))
    record = read_json(base / "source.json")
    assert record["source"] == "random" and record["name"] == "tiny-gpt2" and record["seed"] == 42
    assert read_json(ran / "data/raw/source.json")["rows"] == 4000
    assert not list(ran.glob("**/.*.tmp-*")), "temporary directories left behind"


def test_subset_and_format(ran):
    train = (ran / "data/subset/train.jsonl").read_text().splitlines()
    held_out = (ran / "data/subset/eval.jsonl").read_text().splitlines()
    assert (len(train), len(held_out)) == (16, 8) and not set(train) & set(held_out)
    first = json.loads((ran / "data/formatted/train.jsonl").read_text().splitlines()[0])
    assert first["prompt"].endswith("### Response:\n") and first["completion"] and first["task"]


def test_tokenize(ran):
    import datasets

    stats = read_json(ran / "metrics/tokenize.json")
    assert stats["train"]["rows"] == 16 and stats["eval"]["rows"] == 8
    train = datasets.load_from_disk(str(ran / "data/tokenized/train"))
    for ids, labels in zip(train["input_ids"], train["labels"]):
        assert ids[-1] == 256 and labels[-1] == 256  # byte tokenizer's EOS, trained on
        assert len(ids) == len(labels) <= 384


def test_quantize_inspect(ran):
    figures = read_json(ran / "metrics/quantize.json")
    # tiny-gpt2: 2 blocks x (64*192 + 64*64 + 2*64*256) weights in 4 bit (bitsandbytes on the CPU needs in_features >= 64)
    assert figures["params_4bit"] == 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256)
    assert figures["lora_target_modules"] == ["c_attn", "c_fc", "c_proj"]
    report = (ran / "reports/quantize.md").read_text()
    assert "Linear4bit" in report
    # The comparison with the tutorial's distilgpt2 sizes is for distilgpt2's shapes only (tests/test_quantize.py).
    assert "tutorial printed" not in report and "causal-mask" not in report


def test_train(ran):
    metrics = read_json(ran / "metrics/train.json")
    assert metrics["steps"] == 2 and metrics["rows_per_step"] == 8
    assert math.isfinite(metrics["train_loss"]) and metrics["real_tokens"] > 0
    log = (ran / "metrics/train_log.csv").read_text().splitlines()
    assert log[0] == "step,epoch,loss,learning_rate,grad_norm,tokens,seconds" and len(log) == 3
    adapter = ran / "models/adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = read_json(adapter / "adapter_config.json")
    assert config["r"] == 8 and sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    assert read_json(adapter / "training_params.json")["train"]["max_steps"] == 2


def test_train_is_reproducible(ran, tmp_path):
    """Same params and seed: the same losses and the same adapter, bit for bit, on the CPU; every output of the
    stage the same (wall-clock figures aside). (The pipeline's rerun check, test_pipeline.py, counts on this one
    for train.)"""
    from safetensors.torch import load_file

    again = project_with_inputs(ran, tmp_path, tiny_params())
    run_stage(again, "train.py")
    assert read_json(again / "metrics/train.json")["train_loss"] == read_json(ran / "metrics/train.json")["train_loss"]
    first = load_file(ran / "models/adapter/adapter_model.safetensors")
    second = load_file(again / "models/adapter/adapter_model.safetensors")
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)

    def train_outputs(project):
        return {key: value for key, value in reproducible_outputs(project).items()
                if key.startswith(("models/adapter/", "metrics/train", "dvclive/train/", "checkpoints/train/"))}

    assert len(train_outputs(ran)) > 10 and train_outputs(again) == train_outputs(ran)


def test_merge(ran):
    metrics = read_json(ran / "metrics/merge.json")
    assert metrics["base"] == "dequantized" and metrics["dequantized_weights"] == 2 * 4 and metrics["device"] == "cpu"
    # Folded into the weights it was trained against, the merged model differs from the trained one only by
    # float16's rounding of each weight (2^-11 relative): far below 1e-2 on logits here.
    assert metrics["max_abs_logit_diff_vs_trained"] < 1e-2 and metrics["max_abs_logit_diff_vs_unmerged"] < 1e-2
    merged = ran / "models/merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert read_json(merged / "config.json")["dtype"] == "float16"
    assert read_json(merged / "merge_params.json")["base"] == "dequantized"
    card = (merged / "README.md").read_text()
    assert "tiny-gpt2" in card and "the 4-bit NF4 weights it was trained against, dequantized" in card


def test_evaluate(ran):
    metrics = read_json(ran / "metrics/eval.json")
    for label in ("base", "trained", "merged"):
        assert math.isfinite(metrics[label]["loss"]) and metrics[label]["answer_tokens"] > 0
        assert metrics[label]["perplexity"] == pytest.approx(math.exp(metrics[label]["loss"]), rel=1e-3)
        assert 0 <= metrics[label]["exact_match"] <= 1
        assert metrics[label]["decoding"] == "transformers generate (not a GPU)"   # how its answers were generated
    # Merged into the dequantized weights in float16: the trained model's loss, up to float16 rounding.
    assert abs(metrics["merging"]["loss_change"]) < 1e-3
    assert metrics["merging"]["loss_change"] == round(metrics["merged"]["loss"] - metrics["trained"]["loss"], 6)
    samples = [json.loads(line) for line in (ran / "reports/eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"prompt", "reference", "base", "trained", "merged", "task"} <= set(samples[0])
    page = (ran / "reports/eval.md").read_text()
    assert "| figure | base | trained | merged |" in page and "the dequantized base weights and saved in float16" in page
    series = {row.split(",")[1] for row in (ran / "reports/eval_per_task.csv").read_text().splitlines()[1:]}
    assert series == {"base", "trained", "merged"}


@pytest.mark.parametrize(
    "overrides, script, message",
    [
        ({"lora": {"r": 0}}, "train.py", "error: params key 'lora.r': must be > 0"),
        ({"train": {"learning_rate": 0}}, "train.py", "error: params key 'train.learning_rate': must be > 0"),
        ({"subset": {"train_size": 5000}}, "subset.py", "error: params key 'subset.train_size'"),
        ({"model": {"source": "local", "name": "/nonexistent"}}, "download.py", "error: params key 'model.name': local model directory"),
        ({"model": {"name": "gpt-17"}}, "download.py", "error: params key 'model.name': unknown random architecture 'gpt-17'"),
    ],
)
def test_bad_params_leave_outputs_untouched(ran, tmp_path, overrides, script, message):
    project = project_with_inputs(ran, tmp_path, tiny_params(**overrides), ("models/base", "data/raw", "models/adapter"))
    before = {p: p.read_bytes() for p in project.glob("models/**/*") if p.is_file()}
    result = run_stage(project, script, *(["model"] if script == "download.py" else []), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert {p: p.read_bytes() for p in project.glob("models/**/*") if p.is_file()} == before
    assert not list(project.glob("**/.*.tmp-*"))


def test_bad_data_file_stops_download(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    project = make_project(tmp_path / "p", tiny_params(data={"source": "local", "name": str(bad)}))
    result = run_stage(project, "download.py", "data", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad} row 2: missing column 'output' (params key 'data.columns.output')"
    assert not (project / "data").exists() or not any((project / "data").iterdir())


def test_model_dir_with_only_pickle_weights_is_refused(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    project = make_project(tmp_path / "p", tiny_params(model={"source": "local", "name": str(pickled)}))
    result = run_stage(project, "download.py", "model", check=False)
    assert result.returncode == 2
    assert "no safetensors weights (only pickle weights: pytorch_model.bin" in result.stderr
    assert not (project / "models/base").exists()

    # Allowed by the params: loaded with a warning, and models/base holds them as safetensors.
    project = make_project(tmp_path / "q", tiny_params(model={"source": "local", "name": str(pickled), "allow_pickle": True}))
    result = run_stage(project, "download.py", "model")
    assert "warning: loading pickle weights pytorch_model.bin" in result.stderr
    saved = load_file(project / "models/base/model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_hub_sources_resolve_from_the_local_cache(tmp_path, tiny_model_dir):
    """With HF_HUB_OFFLINE=1 a hub id resolves from the Hugging Face cache, and the commit is recorded."""
    commit_model, commit_data = "a" * 40, "b" * 40
    hub = tmp_path / "hf" / "hub"
    model_snapshot = hub / "models--acme--tiny" / "snapshots" / commit_model
    shutil.copytree(tiny_model_dir, model_snapshot)
    (hub / "models--acme--tiny" / "refs").mkdir()
    (hub / "models--acme--tiny" / "refs" / "main").write_text(commit_model)
    data_snapshot = hub / "datasets--acme--rows" / "snapshots" / commit_data
    data_snapshot.mkdir(parents=True)
    rows = [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(30)]
    (data_snapshot / "rows.json").write_text(json.dumps(rows))
    (hub / "datasets--acme--rows" / "refs").mkdir()
    (hub / "datasets--acme--rows" / "refs" / "main").write_text(commit_data)

    params = tiny_params(model={"source": "hub", "name": "acme/tiny"}, data={"source": "hub", "name": "acme/rows"})
    project = make_project(tmp_path / "p", params)
    import os

    # A (fake) token in the environment, where the hub client reads it: it must not land anywhere.
    fake_token = FAKE_HF_TOKEN
    saved = {key: os.environ.get(key) for key in ("HF_HOME", "HF_TOKEN")}
    os.environ.update(HF_HOME=str(tmp_path / "hf"), HF_TOKEN=fake_token)
    try:
        logs = [run_stage(project, "download.py", "model"), run_stage(project, "download.py", "data")]
        missing = make_project(tmp_path / "q", tiny_params(model={"source": "hub", "name": "acme/absent"}))
        result = run_stage(missing, "download.py", "model", check=False)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    for log in [*logs, result]:
        assert fake_token not in log.stdout + log.stderr
    for file in [p for p in project.rglob("*") if p.is_file()]:
        assert fake_token.encode() not in file.read_bytes(), file
    model_record = read_json(project / "models/base/source.json")
    assert model_record["resolved_commit"] == commit_model and model_record["revision"] == "main"
    data_record = read_json(project / "data/raw/source.json")
    assert data_record["resolved_commit"] == commit_data and data_record["rows"] == 30
    assert result.returncode == 2 and "error: params key 'model.name': cannot get model 'acme/absent'" in result.stderr


def train_variants(ran, tmp_path, variants: dict) -> dict:
    """Train each params variant from the same base and tokenized data; return each one's metrics and step log.
    In this process, through the library function the stage calls (training.train): what is compared is what it
    returns, which the stage writes as metrics/train.json and metrics/train_log.csv (test_train); no
    checkpoints (the stage's own directory handling is test_resume.py's)."""
    from qlora_pipeline.config import parse_params
    from qlora_pipeline.training import train

    out = {}
    for name, overrides in variants.items():
        values = tiny_params(**overrides)
        values["train"]["checkpoint_every_steps"] = 0
        params = parse_params(values)
        metrics, step_rows, _ = train(ran / "models/base", ran / "data/tokenized", tmp_path / name / "adapter",
                                      params.quantize, params.lora, params.train, params.seed)
        out[name] = (metrics, step_rows)
    return out


def assert_same_steps(log_a, log_b, loss_rel, grad_rel):
    assert len(log_a) == len(log_b) == 2
    for a, b in zip(log_a, log_b):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=loss_rel)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=grad_rel)


def test_micro_batches_and_packing_change_execution_not_what_is_optimized(ran, tmp_path):
    """One pass of 8 rows or two of 4, padded or packed: the same loss and the same gradient at every step (the
    loss is normalized over the tokens of the whole optimizer step; a packed row attends only to itself). Adam's first updates are ~lr * sign(grad),
    which turns rounding noise in near-zero gradients into full-size differences, so the adapters
    themselves are compared through the gradient norm, not element by element."""
    runs = train_variants(ran, tmp_path, {
        "one-pass": {"lora": {"dropout": 0.0}, "train": {"micro_batch_size": "auto", "packing": False}},
        "two-passes": {"lora": {"dropout": 0.0}, "train": {"micro_batch_size": 4, "packing": False}},
        "packed": {"lora": {"dropout": 0.0}, "train": {"micro_batch_size": 4, "packing": True}},
        "fused": {"lora": {"dropout": 0.0}, "train": {"micro_batch_size": "auto", "packing": False, "fused_layers": True}},
    })
    assert runs["one-pass"][0]["micro_batch_size"] == 8 and runs["two-passes"][0]["micro_batch_size"] == 4
    assert_same_steps(runs["one-pass"][1], runs["two-passes"][1], 1e-5, 1e-4)
    packed, padded = runs["packed"][0], runs["two-passes"][0]
    assert packed["packing"] and not padded["packing"]
    assert packed["padded_tokens"] == packed["real_tokens"] == padded["real_tokens"] < padded["padded_tokens"]
    assert packed["trained_tokens"] == padded["trained_tokens"]
    assert_same_steps(runs["one-pass"][1], runs["packed"][1], 1e-5, 1e-4)
    assert_same_steps(runs["one-pass"][1], runs["fused"][1], 1e-5, 1e-4)   # fused LoRA layers (fused_layers.py)
    bad = project_with_inputs(ran, tmp_path / "bad", tiny_params(train={"micro_batch_size": 3}))
    result = run_stage(bad, "train.py", check=False)
    assert result.returncode == 2
    assert "params key 'train.micro_batch_size': 3 does not divide the 8 rows of an optimizer step" in result.stderr


def test_execution_params_keep_the_arithmetic(ran, tmp_path):
    """The dequantized-weight cache and the trainer without token metrics compute the same losses and gradients."""
    runs = train_variants(ran, tmp_path, {
        "plain": {"train": {"dequantized_cache_mb": 0, "token_metrics": True, "packing": False}},
        "cached": {"train": {"dequantized_cache_mb": 1024, "token_metrics": True, "packing": False}},
        "quiet": {"train": {"dequantized_cache_mb": 0, "token_metrics": False, "packing": False}},
    })
    assert runs["plain"][0]["dequantized_cache_mb"] == 0 and runs["cached"][0]["dequantized_cache_mb"] > 0
    assert_same_steps(runs["plain"][1], runs["cached"][1], 1e-6, 1e-5)
    assert_same_steps(runs["plain"][1], runs["quiet"][1], 1e-6, 1e-5)


@pytest.mark.parametrize("model", ["models/merged", "models/adapter", "models/base"])
def test_generate_with_the_trained_template(ran, model, monkeypatch, capsys):
    """In this process (the command's own process start is test_generate_names_a_missing_model's)."""
    from qlora_pipeline.generate import cli

    monkeypatch.setattr("sys.argv", ["qlora-generate", "Add the two numbers.", "--input", "1 + 2", "--model", model,
                                     "--project", str(ran), "--max-new-tokens", "4", "--show-prompt"])
    cli()
    out = capsys.readouterr().out
    assert out.startswith("Below is an instruction") and "### Input:\n1 + 2\n\n### Response:\n" in out


def test_generate_names_a_missing_model(ran):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "qlora_pipeline.generate", "Hi.", "--model", "models/nope"],
                            cwd=ran, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --model models/nope: no such directory (run the pipeline first: dvc repro)"


def test_out_of_memory_in_the_first_steps_retries_once_with_a_smaller_plan(ran, tmp_path, monkeypatch, capsys):
    """training.train's fallback, driven on the CPU: the first attempt changes the adapter and runs out of memory;
    the stage warns, puts the adapter back and trains with the smaller plan, as a run started with it does."""
    import dataclasses

    import torch

    from qlora_pipeline import trainer, training

    real_fit, plans = trainer.fit, []

    def fit(model, tokenizer, train_set, eval_set, params, run, *rest):
        plans.append(run)
        if len(plans) == 1:
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        param.add_(1.0)
            raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return real_fit(model, tokenizer, train_set, eval_set, params, run, *rest)

    monkeypatch.setattr(trainer, "fit", fit)
    monkeypatch.setattr(training, "_smaller_execution",
                        lambda run, *_: dataclasses.replace(run, rows_per_pass=4, reason="passes of 4 rows (test)"))
    no_dropout = {"lora": {"dropout": 0.0}, "train": {"packing": False}}
    retried = train_variants(ran, tmp_path, {"retried": no_dropout})["retried"]
    assert "out of GPU memory in the first 3 steps" in capsys.readouterr().err
    assert [p.rows_per_pass for p in plans] == [8, 4] and retried[0]["micro_batch_size"] == 4
    monkeypatch.setattr(trainer, "fit", real_fit)
    fresh = train_variants(ran, tmp_path / "fresh", {"fresh": {"lora": {"dropout": 0.0},
                                                                "train": {"packing": False, "micro_batch_size": 4}}})["fresh"]
    assert_same_steps(retried[1], fresh[1], 1e-6, 1e-5)
