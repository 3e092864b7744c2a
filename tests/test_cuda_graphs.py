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
    assert graph_blockers(params.train, "cuda", 2, torch.bfloat16, _Model(), False)
    assert graph_blockers(params.train, "cuda", 1, torch.bfloat16, _Model(final_logit_softcapping=30.0), False) == [
        "the model's config sets final_logit_softcapping"]
    assert resolve_pad_multiple(params.train, True) == 64 and resolve_pad_multiple(params.train, False) == 1


class _Model:
    """Just enough of a transformers model for graph_blockers."""

    def __init__(self, **config):
        self.config = type("Config", (), {"get_text_config": lambda self: self, **config})()


@gpu
@pytest.mark.parametrize("architecture", ["tiny-gpt2", "tiny-llama"])
def test_graphed_passes_match_eager_passes(tmp_path, architecture):
    """Six steps over batches of several lengths (a capture per padded length, then replays): the same loss and
    gradient norm at every step as eager passes, and the same held-out loss at every evaluation, up to bfloat16
    rounding; and so for peft's own LoRA modules against the fused layers (which save their inputs in bfloat16)."""
    from qlora_pipeline.config import ModelParams

    model_dir = tmp_path / "model"
    fetch_model(ModelParams("random", architecture, "main", False, False), 0, model_dir)
    encoder = load_encoder(model_dir)
    rows = format_rows(generate(64), "alpaca")
    for split, part in (("train", rows[:48]), ("eval", rows[48:])):
        items, _ = tokenize_split(encoder, part, 384, "completion")
        datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "tokenized" / split))
    for packing in (False, True):
        runs = {}
        for name, graphs in (("eager", False), ("graphed", True), ("graphed-2-passes", True), ("peft-modules", False)):
            micro = 4 if name.endswith("passes") else "auto"
            params = params_for(cuda_graphs=graphs, pad_to_multiple_of=16, optim="adamw_torch", packing=packing,
                                micro_batch_size=micro, gradient_checkpointing=False, dequantized_cache_mb=0,
                                fused_layers=name != "peft-modules", eval_every_steps=2)
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
            # The held-out loss at steps 2, 4 and 6: graphed, the first held-out pass runs eagerly, every later one
            # replays a forward-only graph of its shape (eval mode, no gradients).
            assert [row["step"] for row in graphed[2]] == [row["step"] for row in eager[2]] == [2, 4, 6]
            for a, b in zip(eager[2], graphed[2], strict=True):
                assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (packing, name)
