"""quantize-inspect: the tutorial's reference figures (README: The tutorial's experiment), exactly, for distilgpt2
shapes; figures built from shapes alone equal a real 4-bit load's."""

from dataclasses import replace

import pytest

from qlora_pipeline.config import LoraParams, QuantizeParams
from qlora_pipeline.quantization import (MIB, inspect, load_model, lora_config, memory_by_module, report_markdown,
                                         shapes_as_loaded)
from qlora_pipeline.sources import random_model

NF4 = QuantizeParams(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto")


@pytest.fixture(scope="module")
def distilgpt2_dir(tmp_path_factory):
    """distilgpt2's exact config and no weights: quantize-inspect reads none (the figures follow from the shapes)."""
    out = tmp_path_factory.mktemp("distilgpt2")
    random_model("distilgpt2", 0, device="meta").config.save_pretrained(out)
    return out


def test_distilgpt2_figures(distilgpt2_dir):
    lora = LoraParams(r=8, alpha=16, dropout=0.05, target_modules=["c_attn", "c_proj", "c_fc"])
    figures = inspect(distilgpt2_dir, NF4, lora)
    assert figures["params_total"] == 81_912_576
    assert figures["params_4bit"] == 42_467_328 == 6 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)
    assert figures["lora_trainable_params"] == 589_824 == 6 * (24_576 + 12_288 + 30_720 + 30_720)
    assert figures["lora_all_params"] == 82_502_400
    assert figures["lora_trainable_percent"] == 0.7149
    assert figures["size_fp32_mb"] == pytest.approx(312.47, rel=1e-3)
    assert figures["size_4bit_mb"] == pytest.approx(95.49, rel=1e-3)
    assert figures["size_4bit_estimate_mb"] == 95.49
    c_attn = next(m for m in figures["replaced_modules"] if m["module"] == "transformer.h.0.attn.c_attn")
    assert c_attn == {
        "module": "transformer.h.0.attn.c_attn", "from": "Conv1D", "to": "Linear4bit",
        "shape_before": [768, 2304], "dtype_before": "float32", "shape_after": [884736, 1], "dtype_after": "uint8",
    }
    assert len(figures["replaced_modules"]) == 24
    report = report_markdown(figures, {"source": "random", "name": "distilgpt2"})
    assert "| 6 | c_attn | Conv1D | Linear4bit | [768, 2304] | [884736, 1] uint8 |" in report
    assert "318.47" in report and "causal-mask buffer" in report


def test_auto_targets_every_block_linear_layer(distilgpt2_dir):
    figures = inspect(distilgpt2_dir, NF4, LoraParams(8, 16, 0.05, "auto"))
    assert figures["lora_target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert figures["lora_trainable_params"] == 589_824


def test_unknown_target_module_is_refused(distilgpt2_dir):
    from qlora_pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="params key 'lora.target_modules': q_proj not in the model"):
        inspect(distilgpt2_dir, NF4, LoraParams(8, 16, 0.05, ["q_proj"]))


def _tensors(model) -> tuple[list, int]:
    """Every parameter and buffer (name, class, shape, dtype), and the memory footprint in bytes."""
    tensors = [(name, type(p).__name__, tuple(p.shape), p.dtype) for name, p in model.named_parameters()]
    tensors += [(name, "buffer", tuple(b.shape), b.dtype) for name, b in model.named_buffers()]
    return tensors, model.get_memory_footprint()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_shape_only_figures_equal_a_real_4bit_load(name, tmp_path):
    """quantize-inspect builds the model on the meta device; a real bitsandbytes load (CPU) of random weights of the
    same config holds the same tensors, and reports the same figures."""
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model

    random_model(name, 0).save_pretrained(tmp_path)
    lora = LoraParams(8, 16, 0.05, "auto")
    figures = inspect(tmp_path, NF4, lora)

    unquantized = replace(NF4, load_in_4bit=False)
    full = load_model(tmp_path, unquantized, "cpu", torch.float32)
    assert _tensors(shapes_as_loaded(tmp_path, unquantized, torch.float32)) == _tensors(full)
    assert figures["params_total"] == full.num_parameters()
    assert figures["size_fp32_mb"] == round(full.get_memory_footprint() / MIB, 2)
    assert {kind: sizes["float32"] for kind, sizes in figures["memory_by_module"].items()} == memory_by_module(full)

    quantized = load_model(tmp_path, NF4, "cpu", torch.float16)
    assert _tensors(shapes_as_loaded(tmp_path, NF4, torch.float16)) == _tensors(quantized)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * (7 if name == "tiny-llama" else 4)  # every linear layer of the blocks, not the head
    assert [(m["module"], m["shape_after"], m["dtype_after"]) for m in figures["replaced_modules"]] == [
        (n, list(m.weight.shape), "uint8") for n, m in layers.items()]
    assert figures["params_4bit"] == sum(2 * m.weight.numel() for m in layers.values())
    assert figures["size_4bit_mb"] == round(quantized.get_memory_footprint() / MIB, 2)
    assert {kind: sizes["qlora"] for kind, sizes in figures["memory_by_module"].items()} == memory_by_module(quantized)
    with_lora = get_peft_model(quantized, lora_config(lora, figures["lora_target_modules"]))
    trainable, all_params = with_lora.get_nb_trainable_parameters()
    assert (figures["lora_trainable_params"], figures["lora_all_params"]) == (trainable, all_params)
