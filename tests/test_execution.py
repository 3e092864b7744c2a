"""The execution rooms on their own, fast and without a Trainer: how rows are split into passes and counted
(trainer.TokenCountingCollator), the rows each process takes, packing's resolution, checkpointed layers and the
dequantized-weight cache (speedups)."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.config import LoraParams, ModelParams, QuantizeParams, parse_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.execution import resolve_packing, rows_per_process
from qlora_pipeline.sources import fetch_model
from qlora_pipeline.trainer import PASSES, TokenCountingCollator

from helpers import tiny_params


def rows(*lengths):
    return [{"input_ids": list(range(1, n + 1)), "labels": [-100] * (n // 2) + list(range(n // 2 + 1, n + 1))}
            for n in lengths]


def test_collator_splits_a_step_into_passes_within_the_token_budget_and_counts_it_once():
    collator = TokenCountingCollator(0, packing=True, max_tokens_per_pass=10, segments=5)
    batch = collator(rows(4, 5, 6, 3))
    passes = batch[PASSES]
    assert [p["input_ids"].shape[1] for p in passes] == [9, 9]         # 4+5 | 6+3
    assert all(p["cu_seq_lens_q"].shape == (6,) for p in passes)        # the same shape whatever the rows
    # The Trainer counts labels[..., 1:] of the step's rows: the trained tokens of every pass.
    assert int((batch["labels"][..., 1:] != -100).sum()) == 2 + 3 + 3 + 2
    collator.count_next()
    assert (collator.real_tokens, collator.trained_tokens, collator.padded_tokens, collator.passes) == (18, 10, 18, 2)


def test_collator_padded_passes_and_rows_limit():
    collator = TokenCountingCollator(0, packing=False, max_rows_per_pass=2)
    passes = collator(rows(4, 5, 6))[PASSES]
    assert [tuple(p["input_ids"].shape) for p in passes] == [(2, 5), (1, 6)]
    assert passes[0]["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_collator_without_split_gives_one_plain_pass():
    batch = TokenCountingCollator(0, packing=False, split=False)(rows(4, 5))
    assert PASSES not in batch and batch["input_ids"].shape == (2, 5)


def test_rows_per_process_keep_the_step_and_name_the_key():
    params = parse_params(tiny_params(train={"batch_size": 4, "grad_accum": 2}))
    assert rows_per_process(params.train, 1) == 8 and rows_per_process(params.train, 2) == 4
    with pytest.raises(PipelineError, match="params key 'train.num_processes': 3 processes cannot share the 8 rows"):
        rows_per_process(params.train, 3)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    fetch_model(ModelParams("random", "tiny-llama", "main", False, False), 0, out)
    from qlora_pipeline.quantization import load_model

    return load_model(out, QuantizeParams(True, "nf4", True, "float32"), "cpu", torch.float32)


def test_packing_resolution(llama):
    auto = parse_params(tiny_params(train={"packing": "auto"})).train
    assert resolve_packing(auto, llama) == (True, None)
    llama.config.attention_dropout = 0.1
    try:
        assert resolve_packing(auto, llama)[0] is False
        forced = parse_params(tiny_params(train={"packing": True})).train
        with pytest.raises(PipelineError, match="params key 'train.packing' is true but the model applies dropout"):
            resolve_packing(forced, llama)
    finally:
        llama.config.attention_dropout = 0.0


def test_speedups_checkpoint_the_first_layers_and_cache_what_fits(llama):
    import bitsandbytes as bnb
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_pipeline.speedups import cache_dequantized_weights, checkpoint_layers, drop_dequantized_weights

    assert checkpoint_layers(llama, 1) == 1
    assert [layer.gradient_checkpointing for layer in llama.modules() if isinstance(layer, GradientCheckpointingLayer)] == [True, False]
    layers = [m for m in llama.modules() if isinstance(m, bnb.nn.Linear4bit)]
    one = layers[0].weight.quant_state.shape.numel() * 4 / 2**20
    used = cache_dequantized_weights(llama, torch.float32, budget_mb=one * 1.2)
    assert used == round(one, 1) and sum(hasattr(m, "dequantized_weight") for m in layers) == 1
    x = torch.randn(3, layers[0].in_features)
    cached = layers[0](x)
    drop_dequantized_weights(llama)
    assert not any(hasattr(m, "dequantized_weight") or "forward" in vars(m) for m in layers)
    # Dequantized per call again, by bitsandbytes' own CPU kernel, which rounds its own way.
    torch.testing.assert_close(layers[0](x), cached, atol=5e-3, rtol=5e-2)
