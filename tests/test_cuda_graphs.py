"""CUDA-graphed training passes compute what eager passes compute. Needs a GPU: skipped on the CPU
(CI); run on the GPU machine with `pytest tests/test_cuda_graphs.py`."""

from __future__ import annotations

import datasets
import pytest
import torch

from qlora_pipeline.config import parse_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.prompts import format_rows
from qlora_pipeline.sources import fetch_model
from qlora_pipeline.tasks import generate
from qlora_pipeline.tokenization import load_encoder, tokenize_split
from qlora_pipeline.execution import graph_blockers, resolve_pad_multiple
from qlora_pipeline.training import train

from helpers import tiny_params

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def params_for(**train):
    # Dropout off (the tiny model has none either): eager and graphed passes must then agree step by step.
    return parse_params(tiny_params(lora={"dropout": 0.0}, train={"checkpoint_every_steps": 0, "eval_every_steps": 0,
                                                                  "max_steps": 6, **train}))


def test_graphs_are_blocked_only_where_they_would_compute_otherwise():
    params = params_for()
    assert graph_blockers(params.train, "cpu", 1, torch.float32, _Model(), False) == ["training runs on the CPU"]
    assert graph_blockers(params.train, "cuda", 1, torch.bfloat16, _Model(), False) == []
    assert graph_blockers(params.train, "cuda", 2, torch.bfloat16, _Model(), False) == []   # DDP: summed after the step
    fsdp = parse_params(tiny_params(train={"sharding": "fsdp"})).train
    assert graph_blockers(fsdp, "cuda", 2, torch.bfloat16, _Model(), False) == [
        "train.sharding is fsdp (FSDP gathers the weights in each pass)"]
    assert graph_blockers(params.train, "cuda", 1, torch.bfloat16, _Model(final_logit_softcapping=30.0), False) == [
        "the model's config sets final_logit_softcapping"]
    assert resolve_pad_multiple(params.train, True) == 64 and resolve_pad_multiple(params.train, False) == 1


class _Model:
    """Just enough of a transformers model for graph_blockers."""

    def __init__(self, **config):
        self.config = type("Config", (), {"get_text_config": lambda self: self, **config})()


def model_and_rows(tmp_path, architecture):
    """A random `architecture` in tmp_path/model and 48 + 16 tokenized rows of several lengths in tmp_path/tokenized."""
    from qlora_pipeline.config import ModelParams

    model_dir = tmp_path / "model"
    fetch_model(ModelParams("random", architecture, "main", False, False), 0, model_dir)
    encoder = load_encoder(model_dir)
    rows = format_rows(generate(64), "alpaca")
    for split, part in (("train", rows[:48]), ("eval", rows[48:])):
        items, _ = tokenize_split(encoder, part, 384, "completion")
        datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "tokenized" / split))
    return model_dir


@gpu
@pytest.mark.parametrize("architecture", ["tiny-gpt2", "tiny-llama"])
def test_graphed_passes_match_eager_passes(tmp_path, architecture):
    """Six steps over batches of several lengths (a capture per padded length, then replays): the same loss and
    gradient norm at every step as eager passes, up to bfloat16 rounding; and so for peft's own LoRA modules
    against the fused layers (which save their inputs in bfloat16)."""
    model_dir = model_and_rows(tmp_path, architecture)
    for packing in (False, True):
        runs = {}
        for name, graphs in (("eager", False), ("graphed", True), ("graphed-2-passes", True), ("peft-modules", False)):
            micro = 4 if name.endswith("passes") else "auto"
            params = params_for(cuda_graphs=graphs, pad_to_multiple_of=16, optim="adamw_torch", packing=packing,
                                micro_batch_size=micro, gradient_checkpointing=False, dequantized_cache_mb=0,
                                fused_layers=name != "peft-modules")
            runs[name] = train(model_dir, tmp_path / "tokenized", tmp_path / f"{name}-{packing}", params.quantize,
                               params.lora, params.train, params.seed)
        eager = runs["eager"]
        assert eager[0]["cuda_graphs"] is False and eager[0]["packing"] is packing
        assert eager[0]["fused_layers"] is True and runs["peft-modules"][0]["fused_layers"] is False
        for name in ("graphed", "graphed-2-passes", "peft-modules"):
            graphed = runs[name]
            assert graphed[0]["cuda_graphs"] is (name != "peft-modules")
            assert graphed[0]["cuda_graph_shapes"] >= 2 or name == "peft-modules"  # captured once a length, then replayed
            assert eager[0]["real_tokens"] == graphed[0]["real_tokens"]
            for a, b in zip(eager[1], graphed[1], strict=True):
                assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (packing, name)
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2), (packing, name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graphed_passes_under_ddp_match_eager_ones(tmp_path):
    """The train stage on two GPUs (DDP): graphed passes, whose gradients are summed over the processes after each
    step, log the loss and gradient norm of eager passes under DDP's hooks at every step, up to bfloat16 rounding.
    Without the sum each process would step on its half of the rows: another gradient norm from the first step."""
    import csv
    import json
    import shutil

    from helpers import make_project, run_stage

    model_dir = model_and_rows(tmp_path, "tiny-llama")
    logs, metrics = {}, {}
    for graphs in (False, True):
        project = make_project(tmp_path / f"graphs-{graphs}", tiny_params(lora={"dropout": 0.0}, train={
            "num_processes": 2, "cuda_graphs": graphs, "batch_size": 8, "grad_accum": 1, "max_steps": 6,
            "log_every_steps": 1, "checkpoint_every_steps": 0, "eval_every_steps": 0, "optim": "adamw_torch",
            "pad_to_multiple_of": 16, "gradient_checkpointing": False, "dequantized_cache_mb": 0}))
        shutil.copytree(model_dir, project / "models/base")
        shutil.copytree(tmp_path / "tokenized", project / "data/tokenized")
        run_stage(project, "train.py")
        metrics[graphs] = json.loads((project / "metrics/train.json").read_text())
        with open(project / "metrics/train_log.csv") as fh:
            logs[graphs] = list(csv.DictReader(fh))
    assert (metrics[False]["cuda_graphs"], metrics[True]["cuda_graphs"]) == (False, True)
    assert metrics[True]["num_processes"] == 2 and metrics[True]["cuda_graph_shapes"] >= 1
    assert metrics[False]["real_tokens"] == metrics[True]["real_tokens"]
    for eager, graphed in zip(logs[False], logs[True], strict=True):
        assert float(graphed["loss"]) == pytest.approx(float(eager["loss"]), rel=2e-2), eager["step"]
        assert float(graphed["grad_norm"]) == pytest.approx(float(eager["grad_norm"]), rel=5e-2), eager["step"]
