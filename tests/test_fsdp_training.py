"""FSDP2 over the 4-bit tiny Llama on two CPU processes (gloo) computes the one-process loss and LoRA gradients.

The sharding is the train stage's: its decoder layers sharded one by one (trainer.shard_decoder_layers), then
accelerate's fsdp2_prepare_model with the plugin the Trainer gets from trainer._fsdp_options; only the
Accelerator is not one that accelerate sets up for FSDP, since accelerate applies no FSDP plugin on the CPU
(test_sharding.py). The passes are those of a sharded plan that failed on two
GPUs: passes of 2 rows, every layer checkpointed, trl's fused LM head, the passes before a step's last one
without gradient sync (as accelerate's no_sync does it for FSDP2)."""

from __future__ import annotations

import socket
import weakref

import pytest
import torch

ROWS, ROWS_PER_PASS, WORLD = 8, 2, 2


def training_rows() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(ROWS):
        length = int(torch.randint(5, 20, (1,), generator=generator))
        ids = torch.randint(0, 256, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return rows


def trained_tokens(rows) -> int:
    """The step's trained tokens (the loss normalization): labels after each row's first."""
    return sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)


def lora_model(model_dir, sharding: str, fused: bool = False, cache_mb: float = 0.0):
    """The peft model as the train stage prepares it for `sharding` (every layer checkpointed; `fused`: with
    fused_layers.py's LoRA and SwiGLU functions, as train.fused_layers: true gives them), with trl's fused head
    as SFTTrainer adds it, LoRA weights in float32 as trainer.fit keeps them, and LoRA B drawn (it starts at zero,
    which would leave LoRA A without gradient)."""
    from trl.trainer.utils import add_fused_lm_head

    from helpers import tiny_params
    from qlora_pipeline.config import LoraParams, parse_params
    from qlora_pipeline.execution import Execution
    from qlora_pipeline.training import prepare_model

    params = parse_params(tiny_params(model={"source": "random", "name": "tiny-llama"}))
    run = Execution(ROWS // WORLD, ROWS_PER_PASS, float("inf"), False, False, 2, cache_mb, 1, "test", None, sharding, fused)
    torch.manual_seed(0)
    model, _, _ = prepare_model(model_dir, params.quantize, LoraParams(4, 8.0, 0.0, "auto"), params.train, run, "cpu", 0,
                                torch.float32)
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    return model, run


def step(model, rows, step_tokens: int, processes: int, before_last_pass=lambda: None, last_pass=lambda: None):
    """One optimizer step's passes (the train stage's collator splits the rows), each pass's loss as the Trainer's
    loss (trainer.sft_trainer_class: summed log-probabilities over the step's trained tokens, times the processes,
    whose gradients FSDP averages). Returns the summed loss."""
    from qlora_pipeline.trainer import PASSES, TokenCountingCollator

    passes = TokenCountingCollator(256, max_rows_per_pass=ROWS_PER_PASS)(rows)[PASSES]
    total = 0.0
    for index, pass_inputs in enumerate(passes):
        (last_pass if index == len(passes) - 1 else before_last_pass)()
        outputs = model(**pass_inputs, fused_lm_head=True)
        loss = -outputs.log_probs.sum() / step_tokens * processes
        loss.backward()
        total += loss.item() / processes
    return total


def sharded_step(rank: int, port: int, model_dir, out, fused: bool, cache_mb: float) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from trl import SFTConfig

    import torch.distributed.fsdp as fsdp

    from qlora_pipeline.speedups import decoder_layers
    from qlora_pipeline.trainer import _fsdp_options, gather_head_for_fused_loss, shard_decoder_layers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, run = lora_model(model_dir, "fsdp", fused, cache_mb)
        config = SFTConfig(output_dir=str(out / f"trainer-{rank}"), use_cpu=True, report_to="none", **_fsdp_options(run))
        plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)
        plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)   # as trainer.fit sets it
        accelerator = Accelerator(cpu=True)
        accelerator.state.fsdp_plugin = plugin
        # As trainer.fit does: the decoder layers sharded one by one, then accelerate's sharding of the rest.
        gather_head_for_fused_loss(model)
        # The storages themselves (a state dict's detached tensors share them; the Parameter objects may go first).
        whole = [[weakref.ref(p.untyped_storage()) for p in layer.parameters()] for layer in decoder_layers(model)]
        alive_at_each_unit = []
        shard = fsdp.fully_shard

        def counting_shard(module, **kwargs):
            alive_at_each_unit.append(sum(ref() is not None for layer in whole for ref in layer))
            return shard(module, **kwargs)

        fsdp.fully_shard = counting_shard
        try:
            assert shard_decoder_layers(model) == len(whole) == 2
            model = fsdp2_prepare_model(accelerator, model)
        finally:
            fsdp.fully_shard = shard
        # A layer's whole weights are gone once it is sharded, not held to the end of the sharding (what
        # accelerate's own pass over the layers does: 7.4 GiB instead of 5.6 on two GPUs for the 8 B shape).
        per_layer = len(whole[0])
        assert alive_at_each_unit[:2] == [2 * per_layer, per_layer] and alive_at_each_unit[2:] == [0] * (len(alive_at_each_unit) - 2)
        assert sum(type(m).__name__.startswith("FSDP") for m in model.modules()) == 5   # root, embeddings, 2 layers, head
        rows = training_rows()
        mine = rows[rank * len(rows) // WORLD:(rank + 1) * len(rows) // WORLD]
        loss = step(model, mine, trained_tokens(rows), WORLD, before_last_pass=lambda: model.set_requires_gradient_sync(False),
                    last_pass=lambda: model.set_requires_gradient_sync(True))
        losses = [None] * WORLD
        dist.all_gather_object(losses, loss)
        grads = {name: param.grad.full_tensor() for name, param in model.named_parameters() if param.requires_grad}
        if rank == 0:
            torch.save({"loss": sum(losses), "grads": grads}, out / "sharded.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from qlora_pipeline.config import ModelParams
    from qlora_pipeline.sources import fetch_model

    out = tmp_path_factory.mktemp("tiny-llama")
    fetch_model(ModelParams("random", "tiny-llama", "main", False, False), 0, out)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow   # about 30 s each on the 2-core CPU: each process imports torch, transformers, peft and trl
@pytest.mark.parametrize("fused, cache_mb", [(False, 0.0), (True, 0.0), (True, 1e6)],
                         ids=["peft-modules", "fused-layers", "fused-layers-dequantized-cache"])
def test_fsdp_gives_the_one_process_loss_and_lora_gradients(model_dir, tmp_path, fused, cache_mb):
    """fused: the fused functions read the gathered 4-bit weight, whose quantization state FSDP's plain tensor
    does not carry (fused_layers.base_weight takes the layer's). cache_mb: every 4-bit weight also kept
    dequantized (the plan's choice when the budget has room), a buffer FSDP leaves whole on every process."""
    import torch.multiprocessing as mp

    model, run = lora_model(model_dir, "none", fused, cache_mb)
    assert sum(m.forward.__func__.__module__.endswith("fused_layers") for m in model.modules()
               if hasattr(m.forward, "__func__")) == (14 + 2 if fused else 0)   # 7 LoRA layers and an MLP a layer
    assert sum("dequantized_weight" in m._buffers for m in model.modules()) == (14 if cache_mb else 0)
    loss = step(model, training_rows(), trained_tokens(training_rows()), 1)
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    # Spawned, not forked: forked from this process (its threads), they hung.
    mp.spawn(sharded_step, args=(free_port(), model_dir, tmp_path, fused, cache_mb), nprocs=WORLD)
    sharded = torch.load(tmp_path / "sharded.pt")
    assert sharded["loss"] == pytest.approx(loss, rel=1e-5)
    assert sharded["grads"].keys() == grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
