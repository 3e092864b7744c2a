"""The memory plan: from shapes alone (no weights, no GPU), the fastest execution that fits a budget, the
fallback after an out-of-memory error, and one line naming train.max_memory when nothing fits."""

from __future__ import annotations

import pytest

from qlora_pipeline.config import parse_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.memory_plan import (GIB, ModelSize, fallback, layer_activation_bytes, longest_pass_tokens, model_size,
                                        plan_step, shapes_only_model)

from helpers import tiny_params

# Llama-3-8B's shapes with the embedded tokenizer's vocabulary (what model_size reads off its config).
LLAMA_8B = ModelSize(layers=32, hidden=4096, intermediate=14336, vocab=49152, linear_params=6_979_321_856,
                     largest_linear=58_720_256, other_params=402_657_280, lora_params=20_971_520)
# Alpaca-like rows: mostly short, a few cut at 1,024 tokens.
ROWS = [150, 210, 95, 480, 1024, 300, 180, 1024, 260, 120] * 20


def params(**train):
    return parse_params(tiny_params(train=train))


def plan(budget_gib, **train):
    p = params(batch_size=2, grad_accum=5, **train)
    return plan_step(LLAMA_8B, p.train, p.quantize, 10, ROWS, True, budget_gib * GIB, False, graphs_allowed=True)


def test_the_plan_fits_the_budget_and_is_faster_with_more_memory():
    roomy, card_24, card_16 = plan(130), plan(24), plan(16)
    for chosen, budget in ((roomy, 130), (card_24, 24), (card_16, 16)):
        assert chosen.peak_mb < budget * 1024 and chosen.rows_per_pass == 10 and chosen.passes_per_step >= 1
    assert roomy.step_s <= card_24.step_s <= card_16.step_s
    assert roomy.checkpointed_layers == 0 and card_16.checkpointed_layers > 0
    assert card_16.cuda_graphs is False    # checkpointed passes are not captured


def test_fused_layers_let_the_8b_shape_keep_every_layer_within_24_gib():
    """What the H200 run showed (bench/NOTES.md): with the fused layers' 28 h + 7 i bytes a token a layer nothing
    is checkpointed under 24 GiB and passes replay from CUDA graphs; with peft's modules 60 h + 14 i, most layers are."""
    swiglu = ModelSize(**{**LLAMA_8B.__dict__, "swiglu": True})
    fused = layer_activation_bytes(swiglu, fused=True, upcast=True, dropout=True)
    assert fused == 28 * 4096 + 7 * 14336
    assert layer_activation_bytes(swiglu, fused=False, upcast=True, dropout=True) == 60 * 4096 + 14 * 14336
    p = params(batch_size=2, grad_accum=5)
    fused_plan, peft_plan = (plan_step(swiglu, p.train, p.quantize, 10, ROWS, True, 24 * GIB, False, graphs_allowed=True,
                                       layer_bytes=layer_bytes) for layer_bytes in (fused, None))
    assert fused_plan.checkpointed_layers == 0 and fused_plan.cuda_graphs and fused_plan.peak_mb < 24 * 1024
    assert peft_plan.checkpointed_layers > 16 and not peft_plan.cuda_graphs


def test_keys_set_by_hand_win():
    chosen = plan(130, micro_batch_size=2, gradient_checkpointing=True, cuda_graphs=False, dequantized_cache_mb=0)
    assert (chosen.rows_per_pass, chosen.checkpointed_layers, chosen.cuda_graphs, chosen.dequantized_cache_mb) == (2, 32, False, 0)
    assert chosen.tokens_per_pass == 2 * 1024 and chosen.passes_per_step == 5


def test_graphs_set_by_hand_plan_no_checkpointed_layer():
    """A CUDA graph holds no checkpointed layer: asked for, the plan checkpoints none (auto checkpoints some at 24
    GiB), and a budget that needs checkpointing says so."""
    assert plan(24).checkpointed_layers > 0
    graphed = plan(24, cuda_graphs=True)
    assert (graphed.cuda_graphs, graphed.checkpointed_layers) == (True, 0) and graphed.peak_mb < 24 * 1024
    with pytest.raises(PipelineError, match=r"\(the longest row, [\d,]+ tokens, alone in a pass, no layer checkpointed: "
                                            r"train.cuda_graphs is true\)"):
        plan(12, cuda_graphs=True)


def test_nothing_fits_names_the_key_and_the_least_that_would_do():
    with pytest.raises(PipelineError, match=r"params key 'train.max_memory': 4.0 GiB is less than the \d+\.\d GiB"):
        plan(4)


def test_fallback_gives_up_speed_for_memory_step_by_step():
    chosen = plan(130)
    steps = [chosen]
    while (smaller := fallback(steps[-1], LLAMA_8B, 10, ROWS, True)) is not None:
        steps.append(smaller)
    assert steps[1].dequantized_cache_mb == 0 and not steps[1].cuda_graphs
    assert steps[-1].tokens_per_pass == 1024 and steps[-1].checkpointed_layers == 32
    assert [s.tokens_per_pass for s in steps] == sorted((s.tokens_per_pass for s in steps), reverse=True)
    assert [s.passes_per_step for s in steps] == sorted(s.passes_per_step for s in steps)


def test_passes_follow_the_token_budget():
    from qlora_pipeline.memory_plan import mean_passes

    assert mean_passes([100] * 40, 10, 1000, 10, True) == 1
    assert mean_passes([100] * 40, 10, 500, 10, True) == 2
    assert mean_passes([100] * 40, 10, 10_000, 2, True) == 5


def test_longest_pass_packed_or_padded():
    assert longest_pass_tokens([5, 9, 3], 2, packing=True) == 14
    assert longest_pass_tokens([5, 9, 3], 2, packing=False) == 18


def test_model_size_reads_shapes_without_weights(tiny_model_dir):
    lora = params().lora
    size = model_size(shapes_only_model(tiny_model_dir), lora)
    assert size.layers == 2 and size.hidden == 64 and size.vocab == 300
    # tiny-gpt2: c_attn 64x192, c_proj 64x64, c_fc 64x256, mlp c_proj 256x64 per layer; LoRA r 8 on each
    assert size.linear_params == 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)
    assert size.lora_params == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))


def test_graphed_padded_plans_count_the_passes_they_run_by_length():
    """A padded plan replayed from graphs runs each step by length (packing.sorted_passes): a step that fits one
    pass takes two, which passes_per_step reports; falling back to eager passes counts them in the data's order."""
    from qlora_pipeline.memory_plan import mean_passes

    lengths = [100, 300, 200, 50] * 10
    assert mean_passes(lengths, 10, 10_000, 10, False) == 1
    assert mean_passes(lengths, 10, 10_000, 10, False, by_length=True) == 2
    assert mean_passes(lengths, 10, 10_000, 10, True, by_length=True) == 1   # packed: not by length
    p = params(batch_size=2, grad_accum=5)
    graphed = plan_step(LLAMA_8B, p.train, p.quantize, 10, ROWS, False, 130 * GIB, False, graphs_allowed=True)
    assert graphed.cuda_graphs and graphed.rows_per_pass == 10 and graphed.passes_per_step == 2
    eager = fallback(graphed, LLAMA_8B, 10, ROWS, False)
    assert not eager.cuda_graphs and eager.tokens_per_pass == graphed.tokens_per_pass
    assert eager.passes_per_step == round(mean_passes(ROWS, 10, eager.tokens_per_pass, 10, False), 2) == 1.85
