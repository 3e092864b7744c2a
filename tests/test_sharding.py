"""train.sharding: FSDP over the processes, decided from the memory plan (auto), refused where it cannot run.

The stage's FSDP does not run in this suite: accelerate 1.15 applies its FSDP plugin only to GPU-like devices
(AcceleratorState keeps DistributedType.MULTI_CPU on the CPU, and the Trainer then wraps the model in DDP),
so a CPU run with fsdp would silently train whole copies. (torch's fully_shard itself does run on the CPU over
gloo: on the tiny Llama in 4 bit, bfloat16 storage, with a LoRA adapter, two processes gave the one-process
gradient norm, 0.195476, to the last digit; but that is not the path the stage takes.) What is tested here is
what decides and sets it up: the per-process memory of a sharded plan, auto's choice, the refusals, and the
Trainer's FSDP settings; test_fsdp_training.py runs accelerate's sharding of the stage's model on two CPU
processes with the Trainer's passes."""

from __future__ import annotations

import pytest

from qlora_pipeline.config import parse_params
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.execution import Execution, refuse_sharding, resolve_sharding, uses_fused_layers
from qlora_pipeline.memory_plan import (GIB, lora_bytes, longest_pass_tokens, plan_step, sharded_bytes,
                                        weights_bytes)

from helpers import tiny_params
from test_memory_plan import LLAMA_8B, ROWS


def params(**train):
    return parse_params(tiny_params(train={"batch_size": 2, "grad_accum": 5, **train}))


def plan(budget_gib, shards, **train):
    p = params(**train)
    rows = 10 // shards
    return plan_step(LLAMA_8B, p.train, p.quantize, rows, ROWS, True, budget_gib * GIB, False,
                     graphs_allowed=True, shards=shards)


def test_a_shard_holds_its_part_of_the_weights_and_states():
    quantize = params().quantize
    whole = weights_bytes(LLAMA_8B, quantize, True) + lora_bytes(LLAMA_8B, False)
    two, four = (sharded_bytes(LLAMA_8B, quantize, True, False, n) for n in (2, 4))
    assert four < two < whole
    # What is sharded halves from 2 to 4 processes: the packed 4-bit weights and the LoRA states.
    packed_and_lora = LLAMA_8B.linear_params * 0.5 + lora_bytes(LLAMA_8B, False)
    assert two - four == pytest.approx(packed_and_lora / 4)


def test_sharded_plans_fit_where_the_whole_model_does_not():
    with pytest.raises(PipelineError, match=r"params key 'train.max_memory': 7.0 GiB is less than"):
        plan(7, shards=1)
    sharded = plan(7, shards=2)
    assert sharded.peak_mb < 7 * 1024
    # Every process runs as many passes as the others: a fixed number of rows a pass, the token bound what
    # those rows can reach; no graphs; dequantized weights only in what the sharded step leaves of the budget.
    assert sharded.tokens_per_pass == longest_pass_tokens(ROWS, sharded.rows_per_pass, True)
    assert not sharded.cuda_graphs and sharded.dequantized_cache_mb < 0.1 * 7 * 1024
    # With room, every process keeps the whole dequantized copy (made before sharding, beside the loaded model).
    roomy = plan(40, shards=2)
    assert roomy.dequantized_cache_mb == pytest.approx(LLAMA_8B.linear_params * 2 / 2**20, abs=1)
    assert roomy.peak_mb > weights_bytes(LLAMA_8B, params().quantize, True) / 2**20 + roomy.dequantized_cache_mb


def test_a_model_that_does_not_fit_one_gpu_is_loaded_on_the_cpu():
    """Each process loads the whole 4-bit model on its GPU before sharding it where that fits (the fastest start);
    where it does not, on the CPU, and FSDP moves each layer to the GPU as it shards it: the GPU then holds the
    shards and one whole layer, less than the step needs anyway. No dequantized cache then (a whole copy a process)."""
    whole = weights_bytes(LLAMA_8B, params().quantize, True) / GIB   # 4.9 GiB
    on_gpu = plan(whole + 2, shards=4)
    assert not on_gpu.loads_on_cpu and on_gpu.dequantized_cache_mb > 0
    on_cpu = plan(5.5, shards=4)   # the step planned at 5.1 GiB: the whole model and the margin do not fit
    assert on_cpu.loads_on_cpu and on_cpu.dequantized_cache_mb == 0 and on_cpu.peak_mb < 5.5 * 1024
    assert on_cpu.describe().endswith(", loaded on the CPU and moved to the GPU a layer at a time")
    assert "loaded on the CPU" not in on_gpu.describe()
    # The sharded step itself must still fit.
    with pytest.raises(PipelineError, match=r"smallest execution of this model and data needs, sharded over 4 "):
        plan(2, shards=4)


def test_loading_on_the_cpu_is_refused_beyond_the_hosts_memory(monkeypatch):
    """Every process stops with one line where some machine's host cannot hold a model for each of its processes
    (on a process group, all must stop: the others would wait for the one that did)."""
    from qlora_pipeline import distributed, quantization, training

    available = quantization.host_memory_available()
    assert 0 < available < 2**45
    training._refuse_loading_beyond_host_memory(2**20, 2, 7 * GIB)
    with pytest.raises(PipelineError, match=r"^params key 'train.max_memory': the whole model \(32768.0 GiB\) does not "
                                            r"fit a process's GPU budget of 7.0 GiB beside the plan's margins, so each "
                                            r"process loads it on the CPU first, 65536.0 GiB for a machine's 2, but this "
                                            r"machine has [\d.]+ GiB available; free host memory, or spread the "
                                            r"processes over more machines \(train.nnodes\)$"):
        training._refuse_loading_beyond_host_memory(2**45, 2, 7 * GIB)
    monkeypatch.setattr(distributed, "agree_on_any", lambda short: True)   # another process found too little
    with pytest.raises(PipelineError, match="but another machine has less available"):
        training._refuse_loading_beyond_host_memory(2**20, 2, 7 * GIB)


def test_auto_shards_only_when_the_whole_model_does_not_fit():
    planned = []

    def planner(fits_whole):
        def plan_with(shards):
            planned.append(shards)
            if shards == 1 and not fits_whole:
                raise PipelineError("params key 'train.max_memory': too little")
            return f"plan over {shards}"
        return plan_with

    auto = params(sharding="auto").train
    assert resolve_sharding(auto, 2, planner(True)) == ("none", "plan over 1")
    assert resolve_sharding(auto, 2, planner(False)) == ("fsdp", "plan over 2")
    assert resolve_sharding(auto, 1, planner(True)) == ("none", "plan over 1")
    assert resolve_sharding(params(sharding="fsdp").train, 4, planner(True)) == ("fsdp", "plan over 4")
    with pytest.raises(PipelineError, match="too little"):
        resolve_sharding(params(sharding="none").train, 2, planner(False))


def test_fsdp_is_refused_where_it_cannot_run():
    fsdp = params(sharding="fsdp").train
    with pytest.raises(PipelineError, match=r"^params key 'train.sharding' is 'fsdp' but training runs on the CPU"):
        refuse_sharding(fsdp, "cpu", 2)
    with pytest.raises(PipelineError, match="but there is one process to shard over"):
        refuse_sharding(fsdp, "cuda", 1)
    refuse_sharding(fsdp, "cuda", 2)
    refuse_sharding(params(sharding="auto").train, "cpu", 2)


def test_the_trainer_gets_fsdp2_settings(tmp_path):
    from trl import SFTConfig

    from qlora_pipeline.trainer import _fsdp_options

    def execution(sharding, checkpointed):
        return Execution(4, 2, 100.0, False, False, checkpointed, 0.0, 1, "planned", None, sharding)

    assert _fsdp_options(execution("none", 0)) == {}
    options = _fsdp_options(execution("fsdp", 2))
    config = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", gradient_checkpointing=False,
                       **options)
    assert config.fsdp_plugin_args == {
        # The decoder layers are sharded before the Trainer's accelerate shards the rest (test_fsdp_training.py).
        "fsdp_version": 2, "auto_wrap_policy": "NO_WRAP", "cpu_ram_efficient_loading": False,
        "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": False, "reshard_after_forward": True,
    }


def test_fused_layers_under_fsdp_only_when_asked():
    quantize = params().quantize
    assert uses_fused_layers(params(fused_layers="auto").train, quantize, "none", "cuda")
    assert not uses_fused_layers(params(fused_layers="auto").train, quantize, "fsdp", "cuda")
    assert uses_fused_layers(params(fused_layers=True).train, quantize, "fsdp", "cuda")
    assert not uses_fused_layers(params(fused_layers=False).train, quantize, "none", "cuda")
    assert not uses_fused_layers(params(fused_layers="auto").train, quantize, "none", "cpu")
