"""LoRA layers over 4-bit weights, and SwiGLU MLPs, as single autograd functions (`train.fused_layers`).

Why: under peft, a LoRA layer over a bitsandbytes 4-bit layer is a dozen modules and kernels (cast, dequantize,
matmul, cast back, clone, dropout, two small matmuls, scale, add), and autograd keeps what each of them saves:
the layer's input once per projection in float32 (the upcast residual stream), its dropout output and mask, a
bfloat16 copy of it for the LoRA matmul. In Llama's MLP, SiLU and the product keep three float32 copies of the
intermediate activations. On an 8 B model that is 365 KB a token a layer (217 KB fused; bench/step_profile.py),
which forces activation checkpointing (and, with it, eager execution) on a 24 GB card.

What stays the same: each function computes what peft's and transformers' modules compute, with the same
dropout (an independent mask per layer, scaled by 1 / (1 - p)), within one rounding of the compute dtype (the
base and LoRA products are summed in the matmul rather than after rounding each; in Llama's MLP the gate and up
projections, SiLU and the product stay in the compute dtype, which the down projection casts its input to
anyway). What changes is what is kept for the backward pass and how many kernels run:
- a LoRA layer keeps its input once in the compute dtype (shared by the projections reading the same input:
  q, k and v; gate and up), its dropout mask as one byte an element, and the rank-r product; the 4-bit weight
  is dequantized again in the backward pass (or read from the dequantized cache);
- a SwiGLU MLP keeps its gate and up projections (16-bit) and recomputes SiLU in the backward pass.
On the CPU the compute dtype is float32: tests/test_fused_layers.py checks both against peft's modules there
(float32 rounding), tests/test_cuda_graphs.py on a GPU in bfloat16.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref

import torch
import torch.nn.functional as F

# Imported by the train stage only, once it has torch loaded (training.prepare_model imports this module lazily).

# transformers' MLP forward that fuse_swiglu replaces (Llama, Mistral, Qwen2/3, SmolLM and their kin).
_SWIGLU_SOURCE = "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))"
# The activation modules computing F.silu (torch's, and transformers' own from version 5.2x).
_SILU_MODULES = ("SiLU", "SiLUActivation")


def fuse_lora(model) -> int:
    """Make every peft LoRA layer over a bitsandbytes 4-bit layer run as one autograd function (it falls back
    to peft's own forward whenever the layer is merged, disabled, or has several adapters, a variant such as
    DoRA, or a bias). Returns how many layers were changed."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    shared_cast = _SharedCast()
    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            module.forward = types.MethodType(_lora_forward, module)
            module.qlora_shared_cast = shared_cast
            fused += 1
    return fused


def fuse_swiglu(model) -> int:
    """Make every MLP of the form down(silu(gate(x)) * up(x)) keep its gate and up outputs in the compute
    dtype only (SiLU is recomputed in the backward pass). Returns how many MLPs were changed."""
    fused = 0
    for module in model.modules():
        if is_swiglu(module):
            module.forward = types.MethodType(_swiglu_forward, module)
            fused += 1
    return fused


def is_swiglu(module) -> bool:
    """Whether `module` is a transformers MLP computing down(silu(gate(x)) * up(x)), read from its code."""
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    if type(module.act_fn).__name__ not in _SILU_MODULES:
        return False
    return _SWIGLU_SOURCE in _forward_source(type(module))


@functools.cache
def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


class _SharedCast:
    """The last input cast to the compute dtype, reused while the same tensor comes again unchanged: q, k and v
    (gate and up) read one input, and their autograd functions then keep one copy of it, not three.
    Held by weak reference: the cast lives as long as a function keeps it for the backward pass."""

    def __init__(self):
        self.source = self.cast = None
        self.version = -1

    def __call__(self, x, dtype):
        if x.dtype == dtype:
            return x.detach()
        source = self.source() if self.source else None
        cast = self.cast() if self.cast else None
        if source is x and cast is not None and cast.dtype == dtype and self.version == x._version:
            return cast
        cast = x.detach().to(dtype)
        self.source, self.cast, self.version = weakref.ref(x), weakref.ref(cast), x._version
        return cast


def _lora_forward(self, x, *args, **kwargs):
    """peft's LoraLayer forward for the single-adapter case, as one autograd function."""
    if args or kwargs or not _fusable(self):
        return type(self).forward(self, x, *args, **kwargs)
    return _lora_apply(self, x, x.dtype)


def _fusable(layer) -> bool:
    adapters = layer.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    return not (layer.disable_adapters or layer.merged or name is None or name not in layer.lora_A
                or name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None)


def _lora_apply(layer, x, out_dtype):
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    p = float(getattr(layer.lora_dropout[name], "p", 0.0)) if layer.training else 0.0
    compute_dtype = base.compute_dtype or x.dtype
    return LoraLinear.apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight,
                            layer.qlora_shared_cast(x, compute_dtype), base, float(layer.scaling[name]), p, out_dtype)


def _swiglu_forward(self, x):
    """down(silu(gate(x)) * up(x)) with gate and up left in the compute dtype: SiLU and the product then run in
    it too (PyTorch computes them in float32 and rounds once), and the product is what down_proj would have
    cast its input to anyway. SwiGLU keeps gate and up, the tensors the LoRA functions returned."""
    if all(hasattr(m, "qlora_shared_cast") and _fusable(m) for m in (self.gate_proj, self.up_proj)):
        compute_dtype = self.gate_proj.get_base_layer().compute_dtype or x.dtype
        gate, up = (_lora_apply(m, x, compute_dtype) for m in (self.gate_proj, self.up_proj))
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(SwiGLU.apply(gate, up))


def base_weight(layer, dtype):
    """The 4-bit layer's weight in `dtype`: from the dequantized cache (speedups.cache_dequantized_weights)
    where it has one, else dequantized now (what bitsandbytes' matmul does on every call)."""
    import bitsandbytes.functional as bnbf

    # The layout dequantize_4bit reads: the train stage turns off bitsandbytes' CPU inference repack
    # (speedups.keep_4bit_layers_trainable) before any forward.
    cached = layer._buffers.get("dequantized_weight")
    if cached is not None:
        return cached.to(dtype)
    # Under FSDP the gathered weight is a plain tensor: bitsandbytes keeps its quantization state on the layer too.
    quant_state = getattr(layer.weight, "quant_state", None) or layer.quant_state
    return bnbf.dequantize_4bit(layer.weight.data, quant_state).to(dtype)


class LoraLinear(torch.autograd.Function):
    """y = W x + b + s * B (A (dropout(x))), W the frozen 4-bit weight, A and B the LoRA matrices.

    Inputs: x (any float dtype), A and B (trainable, any dtype; their gradients get it), x_c = x in the compute
    dtype (possibly shared with other layers reading x), the bitsandbytes layer, the scale s, the dropout
    probability p (0: no dropout), the dtype of y. The base and LoRA products are summed in the matmul's
    epilogue (float32 accumulation, one rounding to the compute dtype) and y is cast to `out_dtype`; peft rounds
    each product to the compute dtype and sums them in x's dtype (float32 when upcast): the same within one
    rounding of the compute dtype. The input gradient is returned in the compute dtype; autograd casts it to
    x's dtype, where the projections reading x are summed (in float32 when upcast, as under peft)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, x_c, layer, scaling, p, out_dtype):
        with torch.autocast(x.device.type, enabled=False):
            dtype = x_c.dtype
            bias = None if layer.bias is None else layer.bias.to(dtype)
            keep = None
            dropped = x_c
            if p > 0:
                dropped, keep = torch.native_dropout(x_c, p, True)   # one kernel: x * mask / (1 - p), and the mask
            rank_r = F.linear(dropped, lora_a.to(dtype))
            base = F.linear(x_c, base_weight(layer, dtype), bias)
            base.view(-1, base.shape[-1]).addmm_(rank_r.reshape(-1, rank_r.shape[-1]), lora_b.to(dtype).t(), alpha=scaling)
            result = base.to(out_dtype)
        ctx.save_for_backward(x_c, keep, rank_r, lora_a, lora_b)
        ctx.layer, ctx.scaling, ctx.p = layer, scaling, p
        return result

    @staticmethod
    def backward(ctx, grad):
        x_c, keep, rank_r, lora_a, lora_b = ctx.saved_tensors
        dtype, scaling, p = x_c.dtype, ctx.scaling, ctx.p
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.to(dtype).reshape(-1, grad.shape[-1])
            x_flat = x_c.reshape(-1, x_c.shape[-1])
            grad_x = grad_a = grad_b = None
            grad_rank_r = torch.mm(g, lora_b.to(dtype)).mul_(scaling)                  # (tokens, r)
            if ctx.needs_input_grad[2]:
                grad_b = torch.mm(g.t(), rank_r.reshape(-1, rank_r.shape[-1])).mul_(scaling).to(lora_b.dtype)
            if ctx.needs_input_grad[1]:
                dropped = x_flat if keep is None else torch.ops.aten.native_dropout_backward(
                    x_flat, keep.reshape(x_flat.shape), 1 / (1 - p))
                grad_a = torch.mm(grad_rank_r.t(), dropped).to(lora_a.dtype)
            if ctx.needs_input_grad[0]:
                grad_dropped = torch.mm(grad_rank_r, lora_a.to(dtype))
                if keep is not None:
                    grad_dropped = torch.ops.aten.native_dropout_backward(
                        grad_dropped, keep.reshape(grad_dropped.shape), 1 / (1 - p))
                grad_x = torch.addmm(grad_dropped, g, base_weight(ctx.layer, dtype)).view(x_c.shape)
        return grad_x, grad_a, grad_b, None, None, None, None, None


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up in their dtype, keeping gate and up for the backward pass (which recomputes SiLU)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        grad_up = grad * F.silu(gate)
        return grad_gate, grad_up
