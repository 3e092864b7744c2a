"""quantize-inspect: the tutorial's reference figures (README: The tutorial's experiment), exactly, for distilgpt2 shapes."""

import pytest

from qlora_pipeline.config import LoraParams, QuantizeParams
from qlora_pipeline.quantization import inspect, report_markdown
from qlora_pipeline.sources import random_model

NF4 = QuantizeParams(load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="auto")


@pytest.fixture(scope="module")
def distilgpt2_dir(tmp_path_factory):
    """Random weights with distilgpt2's exact config (the figures follow from the shapes alone)."""
    out = tmp_path_factory.mktemp("distilgpt2")
    random_model("distilgpt2", 0).save_pretrained(out)
    return out


def test_distilgpt2_figures(distilgpt2_dir):
    lora = LoraParams(r=8, alpha=16, dropout=0.05, target_modules=["c_attn", "c_proj", "c_fc"])
    figures = inspect(distilgpt2_dir, NF4, lora, "cpu")
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
    figures = inspect(distilgpt2_dir, NF4, LoraParams(8, 16, 0.05, "auto"), "cpu")
    assert figures["lora_target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert figures["lora_trainable_params"] == 589_824


def test_unknown_target_module_is_refused(distilgpt2_dir):
    from qlora_pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="params key 'lora.target_modules': q_proj not in the model"):
        inspect(distilgpt2_dir, NF4, LoraParams(8, 16, 0.05, ["q_proj"]), "cpu")
