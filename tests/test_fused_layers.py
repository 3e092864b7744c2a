"""The fused LoRA and SwiGLU functions (fused_layers.py) compute what peft's and transformers' modules compute:
the same loss and LoRA gradients within float32 rounding on tiny random Llama and GPT-2 models in 4 bit on the
CPU (upcast as the train stage does), and with dropout the same masks give the same results."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline import fused_layers
from qlora_pipeline.config import LoraParams, ModelParams, QuantizeParams
from qlora_pipeline.quantization import load_model, lora_config, resolve_target_modules
from qlora_pipeline.sources import fetch_model


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    fetch_model(ModelParams("random", request.param, "main", False, False), 0, out)
    return out


def lora_model(model_dir, dropout: float = 0.0):
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = LoraParams(4, 8.0, dropout, "auto")
    torch.manual_seed(0)
    model = load_model(model_dir, QuantizeParams(True, "nf4", True, "float32"), "cpu", torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(lora, resolve_target_modules(model, lora)))
    for name, param in model.named_parameters():   # LoRA B starts at zero: give the gradients something to see
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    # Training mode, as the train stage runs (in eval mode without gradients bitsandbytes' CPU kernel computes
    # in bfloat16 instead).
    return model.train()


def loss_and_grads(model, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.autograd.grad(loss, params)


def test_fused_model_gives_peft_loss_and_gradients(model_dir):
    model = lora_model(model_dir)
    input_ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    want_loss, want_grads = loss_and_grads(model, input_ids)
    lora_layers = sum(hasattr(m, "lora_A") and hasattr(m, "get_base_layer") for m in model.modules())
    assert fused_layers.fuse_lora(model) == lora_layers == (14 if model.config.model_type == "llama" else 8)
    mlps = fused_layers.fuse_swiglu(model)
    assert mlps == (model.config.num_hidden_layers if model.config.model_type == "llama" else 0)
    got_loss, got_grads = loss_and_grads(model, input_ids)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with model.disable_adapter(), torch.no_grad():   # peft's own forward where the fused one does not apply
        base = model(input_ids=input_ids).logits
    with torch.no_grad():
        assert not torch.allclose(base, model(input_ids=input_ids).logits)


def test_dropout_with_the_same_mask_gives_the_same_layer(model_dir):
    model = lora_model(model_dir, dropout=0.3)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer"))
    fused_layers.fuse_lora(model)
    model.train()
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(1)
    got = layer(x)
    (got_x, got_a, got_b) = torch.autograd.grad(got.square().sum(), (x, layer.lora_A["default"].weight,
                                                                      layer.lora_B["default"].weight))
    torch.manual_seed(1)   # the function's first random draw is its mask: draw it again
    _, keep = torch.native_dropout(x.detach(), 0.3, True)
    assert 0 < keep.float().mean() < 1
    base = layer.get_base_layer()
    weight = fused_layers.base_weight(base, torch.float32)
    want = torch.nn.functional.linear(x, weight, base.bias) + layer.scaling["default"] * layer.lora_B["default"](
        layer.lora_A["default"](x * keep / 0.7))
    want_x, want_a, want_b = torch.autograd.grad(want.square().sum(), (x, layer.lora_A["default"].weight,
                                                                         layer.lora_B["default"].weight))
    torch.testing.assert_close(got, want)
    for g, w in ((got_x, want_x), (got_a, want_a), (got_b, want_b)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_swiglu_recomputes_silu_for_the_same_gradients():
    gate, up = (torch.randn(64, 48, requires_grad=True) for _ in range(2))
    grad = torch.randn(64, 48)
    want = torch.nn.functional.silu(gate) * up
    got = fused_layers.SwiGLU.apply(gate, up)
    torch.testing.assert_close(got, want)
    for got_grad, want_grad in zip(torch.autograd.grad(got, (gate, up), grad), torch.autograd.grad(want, (gate, up), grad)):
        torch.testing.assert_close(got_grad, want_grad)


def test_an_evaluation_pass_leaves_the_4bit_layers_trainable(model_dir):
    """bitsandbytes repacks CPU 4-bit weights for inference on an eval-mode call without gradients, and the
    repacked kernel has no backward: the gradients of a training pass after an evaluation must stay the same."""
    from qlora_pipeline.speedups import keep_4bit_layers_trainable

    input_ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    model = lora_model(model_dir)
    assert keep_4bit_layers_trainable(model) == (14 if model.config.model_type == "llama" else 8)
    _, want = loss_and_grads(model, input_ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    model.train()
    _, got = loss_and_grads(model, input_ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
