"""The merge folds the adapter into the weights it was trained against (merge.base: dequantized) or into
the original full-precision ones (original), on a tiny random GPT-2 with a random adapter."""

import json

import pytest

from qlora_pipeline.config import LoraParams, MergeParams, QuantizeParams

QUANTIZE = QuantizeParams(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto")


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the 4-bit tiny model with random B matrices (peft starts them at zero, which would
    make every merge exact), saved as the train stage saves it, and two held-out rows."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from qlora_pipeline.merging import load_base_as_trained
    from qlora_pipeline.quantization import lora_config

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(load_base_as_trained(tiny_model_dir, QUANTIZE, "cpu", torch.float32),
                           lora_config(LoraParams(8, 16, 0.0, "auto"), ["c_attn", "c_fc", "c_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(out / "adapter")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out / "adapter")
    rows = [{"prompt": f"### Instruction:\nAdd {i} and {i}.\n\n### Response:\n", "completion": str(2 * i)} for i in (3, 40)]
    (out / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def test_dequantized_base_computes_what_was_trained(tiny_model_dir, adapter, tmp_path):
    """Merged in float32 (no final rounding): folded into the dequantized 4-bit weights, the merged model
    computes the trained model's logits up to float32 rounding; folded into the original weights, it is off
    by the quantization error of every layer (0.066 on logits up to 0.75 here, measured)."""
    from safetensors.torch import load_file

    dequantized, original = (merge_with(base, "float32", tiny_model_dir, adapter, tmp_path / base)
                             for base in ("dequantized", "original"))
    assert dequantized["dequantized_weights"] == 2 * 4 and original["dequantized_weights"] == 0
    assert dequantized["max_abs_logit_diff_vs_trained"] < 1e-5
    assert original["max_abs_logit_diff_vs_trained"] > 1e-2
    assert dequantized["max_abs_logit_diff_vs_unmerged"] < 1e-5 and original["max_abs_logit_diff_vs_unmerged"] < 1e-5
    weights = load_file(tmp_path / "dequantized" / "model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}


def merge_with(base: str, dtype: str, model_dir, adapter, out):
    from qlora_pipeline.merging import merge

    return merge(model_dir, adapter / "adapter", adapter / "eval.jsonl", out, MergeParams(base, dtype, 2), QUANTIZE, "cpu")


def test_float32_copies_leave_a_gpu_they_do_not_fit(tiny_model_dir, monkeypatch):
    """The merge keeps its float32 models on the GPU only where 5 bytes a parameter (8 without 4 bit) + 1 GiB
    are free there (an 8 B model's ~37 GB are not on a 24 GB card), else on the CPU, if its memory holds one."""
    import collections

    import psutil

    from qlora_pipeline import merging, quantization
    from qlora_pipeline.errors import PipelineError

    parameters = quantization.shapes_only_model(tiny_model_dir).num_parameters()
    assert merging.full_precision_device(tiny_model_dir, "cpu", True) == "cpu"
    for load_in_4bit, per_parameter in ((True, 5), (False, 8)):
        needed = per_parameter * parameters + 2**30
        monkeypatch.setattr(quantization, "memory_budget", lambda max_memory: needed)
        assert merging.full_precision_device(tiny_model_dir, "cuda", load_in_4bit) == "cuda"
        monkeypatch.setattr(quantization, "memory_budget", lambda max_memory: needed - 1)
        assert merging.full_precision_device(tiny_model_dir, "cuda", load_in_4bit) == "cpu"
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(4 * parameters - 1))
    monkeypatch.setattr(quantization, "memory_budget", lambda max_memory: 0)
    with pytest.raises(PipelineError, match=r"^merge needs 0.0 GiB of memory for the float32 model on the CPU"):
        merging.full_precision_device(tiny_model_dir, "cuda", True)
