"""Training passes (forward, loss, backward) replayed from CUDA graphs, one graph per batch shape.

Why: a small model's training step is bound by the CPU, which issues ~700 kernels a pass one by one while
the GPU waits (bench/NOTES.md). A CUDA graph records those kernels once and replays them in one launch.

What stays the same: the rows of each step, the loss (the answer tokens' negative log-likelihood summed
and divided by the step's trained tokens, as SFTTrainer computes it) and so the gradients, up to rounding:
- No attention mask. Padded batches are right-padded and attention is causal, so no real token attends to a
  pad; packed passes carry their row boundaries (packing.py), whose tensors are static inputs like the ids.
  Pads carry label -100, so no gradient reaches them either.
- The LM head scores every position and the loss masks out the untrained ones (trl's fused head in the
  static-shape form it uses off Triton), where the eager pass gathers the trained positions first: that
  gather has a data-dependent shape, which a graph cannot hold.
Each new shape is captured once (about one eager pass of CPU time); train.pad_to_multiple_of keeps the
number of shapes small. Dropout stays random: the graph draws fresh random numbers at every replay.
Checkpointed layers are not captured: their recomputation reads the RNG state on the host.

The held-out passes of the evaluations during training replay graphs of their own: the forward and the loss
only, captured with the model in eval mode (no dropout) and without gradients. Eager, each held-out pass made
the CPU wait for the GPU four times (transformers' padding-mask checks, trl's gather of trained positions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

# Vocabulary columns per tile of trl's chunked log-probability kernel (trl's own setting).
_VOCAB_CHUNK = 32768
# Config fields that change the LM head's logits (scales, soft-capping): a model with any of them trains eagerly.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def unsupported_model(model) -> str | None:
    """Why the graphed pass cannot reproduce this model's loss, or None when it can."""
    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) is not None:
            return f"the model's config sets {name}"
    if getattr(config, "output_router_logits", False):
        return "the model is a mixture of experts with a router loss"
    return None


@dataclass
class _Captured:
    graph: Any
    input_ids: Any       # static inputs: each replay reads them, so batches are copied in
    labels: Any
    num_items: Any
    boundaries: dict     # a packed batch's positions and row boundaries (static too); empty when padded
    loss: Any            # static output: each replay overwrites it


class GraphedTrainingPass:
    """Forward, loss and backward of one batch of a single-process run, from a CUDA graph per batch shape.

    Each pass adds its gradients into one set of buffers, allocated once outside the graphs' memory pool, and
    `__call__` leaves each trainable parameter's `.grad` pointing at its buffer: the gradients of several passes
    of an optimizer step add up there, as `loss.backward()` would accumulate them. The first pass of a step
    (every `.grad` is None after the optimizer's zero_grad) clears the buffers. Graphs share one memory pool,
    so the pool holds one pass's activations whatever the number of shapes."""

    def __init__(self, peft_model, compute_dtype):
        import torch

        lm = peft_model.get_base_model()
        self.backbone = lm.base_model          # the transformer without its LM head
        self.head = lm.get_output_embeddings()
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.compute_dtype = compute_dtype
        self.pool = None
        self.stream = torch.cuda.Stream()
        self.graphs: dict[tuple, _Captured] = {}   # (pass kind, shapes) -> its graph
        self.warmed_up = False
        self.held_out_warmed_up = False
        self.capture_seconds = 0.0

    def loss(self, input_ids, labels, num_items, boundaries):
        """The pass a graph records, runnable eagerly too: -sum of log p(label) / num_items."""
        import torch
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        autocast = torch.autocast("cuda", dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32,
                                  cache_enabled=False)  # a graph must not keep casts cached across replays
        with autocast:
            hidden = self.backbone(input_ids=input_ids, use_cache=False, **boundaries).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            trained = targets != -100
            log_probs = ChunkedLogProbFunction.apply(
                hidden.reshape(-1, hidden.size(-1)), self.head.weight, self.head.bias,
                targets.clamp(min=0).reshape(-1), 1.0, _VOCAB_CHUNK, None, 1.0, ("log_probs",),
            )[0]
            return -log_probs.view(trained.shape).masked_fill(~trained, 0).sum() / num_items.clamp(min=1)

    def _backward_into_buffers(self, loss) -> None:
        import torch

        torch._foreach_add_(self.grads, torch.autograd.grad(loss, self.params))

    def __call__(self, input_ids, labels, num_items, boundaries: dict | None = None):
        import torch

        boundaries = _static_boundaries(boundaries or {}, input_ids.shape[1])
        if all(p.grad is None for p in self.params):   # the first pass of an optimizer step
            torch._foreach_zero_(self.grads)
        if not self.warmed_up:
            # The first pass runs eagerly on the capture stream: it initializes what must not be initialized
            # while capturing (kernel compilation, library handles and workspaces), and it is real training.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                loss = self.loss(input_ids, labels, torch.as_tensor(num_items, device=input_ids.device), boundaries)
                self._backward_into_buffers(loss)
            torch.cuda.current_stream().wait_stream(self.stream)
            self.warmed_up = True
            loss = loss.detach()
            # The eager pass's cached blocks go back to the GPU, so that the graphs' pool can take that memory.
            torch.cuda.empty_cache()
        else:
            loss = self._replay("train", input_ids, labels, num_items, boundaries)
        for param, grad in zip(self.params, self.grads):
            param.grad = grad
        return loss

    def held_out(self, input_ids, labels, boundaries: dict | None = None):
        """-(sum of the trained tokens' log-probabilities) of a held-out pass (the model in eval mode, no gradients)."""
        import torch

        boundaries = _static_boundaries(boundaries or {}, input_ids.shape[1])
        if not self.held_out_warmed_up:
            # Eval mode runs kernels training did not (attention without dropout): the first pass runs them
            # eagerly, on the capture stream, before any is captured.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream), torch.no_grad():
                loss = self.loss(input_ids, labels, torch.ones((), dtype=torch.int64, device=input_ids.device), boundaries)
            torch.cuda.current_stream().wait_stream(self.stream)
            self.held_out_warmed_up = True
            return loss
        return self._replay("held-out", input_ids, labels, 1, boundaries)

    def _replay(self, kind: str, input_ids, labels, num_items, boundaries: dict):
        """Copy the pass's inputs into the graph of its kind and shape (captured first if new), replay it; its loss."""
        import torch

        key = (kind, tuple(input_ids.shape), *(tuple(v.shape) for v in boundaries.values() if hasattr(v, "shape")))
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(input_ids, boundaries, backward=kind == "train")
        captured.input_ids.copy_(input_ids)
        captured.labels.copy_(labels)
        if kind == "train":   # a held-out graph divides by the 1 it was captured with: no copy (and no wait) for it
            captured.num_items.copy_(torch.as_tensor(num_items))
        for name, value in boundaries.items():
            if hasattr(value, "copy_"):
                captured.boundaries[name].copy_(value)
        captured.graph.replay()
        return captured.loss.detach().clone()

    def _capture(self, example_ids, example_boundaries, backward: bool) -> _Captured:
        import contextlib

        import torch

        start = time.perf_counter()
        input_ids = torch.zeros_like(example_ids)
        labels = torch.full_like(example_ids, -100)
        num_items = torch.ones((), dtype=torch.int64, device=example_ids.device)
        boundaries = {k: v.clone() if hasattr(v, "clone") else v for k, v in example_boundaries.items()}
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream), \
                (contextlib.nullcontext() if backward else torch.no_grad()):
            loss = self.loss(input_ids, labels, num_items, boundaries)
            if backward:
                self._backward_into_buffers(loss)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.capture_seconds += time.perf_counter() - start
        return _Captured(graph, input_ids, labels, num_items, boundaries, loss)


def _static_boundaries(boundaries: dict, tokens: int) -> dict:
    """A packed batch's boundaries with a static longest-row length: flash attention needs it only as an upper
    bound, and a graph bakes it in, so the pass's token count stands for it."""
    return {k: (tokens if k.startswith("max_length") else v) for k, v in boundaries.items()}
