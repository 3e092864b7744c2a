"""Changes to the model that make a training pass faster or smaller without changing what it computes."""

from __future__ import annotations

import types


def fuse_activations(model) -> int:
    """Swap GPT-2's gelu_new, composed of eight elementwise ops (each kept for the backward pass), for
    PyTorch's fused kernel of the same tanh approximation. Returns how many modules were swapped."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def _dequantized_forward(self, x):
    """Linear4bit.forward with the weight dequantized once: bitsandbytes' 4-bit matmul also dequantizes to the
    compute dtype and multiplies, so the arithmetic is the same; only the per-call dequantization is gone."""
    import torch.nn.functional as F

    input_dtype = x.dtype
    x = x.to(self.dequantized_weight.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.dequantized_weight, bias).to(input_dtype)


def cache_dequantized_weights(model, compute_dtype, budget_mb: float) -> float:
    """Keep frozen 4-bit weights also dequantized in `compute_dtype`, layer by layer in model order while they
    fit in `budget_mb`. Returns the MiB used (0 when the model has no 4-bit layers)."""
    import bitsandbytes as bnb
    import torch

    element_size = torch.empty((), dtype=compute_dtype).element_size()
    used = 0.0
    for layer in (m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)):
        size_mb = layer.weight.quant_state.shape.numel() * element_size / 2**20
        if used + size_mb > budget_mb:
            break
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        layer.register_buffer("dequantized_weight", weight.to(layer.compute_dtype or compute_dtype), persistent=False)
        layer.forward = types.MethodType(_dequantized_forward, layer)
        used += size_mb
    return round(used, 1)


def keep_4bit_layers_trainable(model) -> int:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for its inference kernel, in place and
    for good, the first time the layer runs in eval mode without gradients (as the held-out evaluation during
    training does); that kernel has no backward, so every later training pass would lose the gradients through
    the 4-bit layers (measured: an evaluation at step 2 changed step 3's gradient norm from 0.364 to 0.197).
    Turn the repack off for a model that trains. Returns how many layers were changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def decoder_layers(model) -> list:
    """The model's decoder layers, in order (transformers marks each as a GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model, count: int) -> int:
    """Recompute the activations of the first `count` decoder layers in the backward pass instead of keeping
    them (non-reentrant checkpointing, which keeps dropout masks by restoring the RNG state). Every layer
    holds the same activations, so which ones does not matter for memory. Returns how many layers are
    checkpointed."""
    if not count:
        return 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    return min(count, len(layers))


def drop_dequantized_weights(model) -> None:
    """Undo cache_dequantized_weights: each layer dequantizes per call again, and the cache's memory is freed."""
    for module in model.modules():
        if "dequantized_weight" in module._buffers:
            del module._buffers["dequantized_weight"]
            del module.forward
