"""Training passes (forward, loss, backward) replayed from CUDA graphs, one graph per batch shape.

Why: a small model's training step is bound by the CPU, which issues ~700 kernels a pass one by one while
the GPU waits (bench/NOTES.md). A CUDA graph records those kernels once and replays them in one launch.

What stays the same: the rows of each step, the loss (the answer tokens' negative log-likelihood summed
and divided by the step's trained tokens, as SFTTrainer computes it) and so the gradients, up to rounding:
- No attention mask. Batches are right-padded and attention is causal, so no real token attends to a pad;
  pads carry label -100, so no gradient reaches them either.
- The LM head scores every position and the loss masks out the untrained ones (trl's fused head in the
  static-shape form it uses off Triton), where the eager pass gathers the trained positions first: that
  gather has a data-dependent shape, which a graph cannot hold.
Each new shape is captured once (about one eager pass of CPU time); train.pad_to_multiple_of keeps the
number of shapes small. Dropout stays random: the graph draws fresh random numbers at every replay.
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
    loss: Any            # static outputs: each replay overwrites them
    grads: list


class GraphedTrainingPass:
    """Forward, loss and backward of one batch of a single-process run, from a CUDA graph per batch shape.

    `__call__` leaves each trainable parameter's `.grad` holding this batch's gradient (as `loss.backward()`
    on parameters without gradients does) and returns the loss. The caller must have consumed the gradients
    (optimizer step, zero_grad) before the next call: graphs share one memory pool."""

    def __init__(self, peft_model, compute_dtype):
        import torch

        lm = peft_model.get_base_model()
        self.backbone = lm.base_model          # the transformer without its LM head
        self.head = lm.get_output_embeddings()
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.compute_dtype = compute_dtype
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.graphs: dict[tuple[int, ...], _Captured] = {}
        self.warmed_up = False
        self.capture_seconds = 0.0

    def loss(self, input_ids, labels, num_items):
        """The pass a graph records, runnable eagerly too: -sum of log p(label) / num_items."""
        import torch
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        autocast = torch.autocast("cuda", dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32,
                                  cache_enabled=False)  # a graph must not keep casts cached across replays
        with autocast:
            hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            trained = targets != -100
            log_probs = ChunkedLogProbFunction.apply(
                hidden.reshape(-1, hidden.size(-1)), self.head.weight, self.head.bias,
                targets.clamp(min=0).reshape(-1), 1.0, _VOCAB_CHUNK, None, 1.0, ("log_probs",),
            )[0]
            return -log_probs.view(trained.shape).masked_fill(~trained, 0).sum() / num_items.clamp(min=1)

    def __call__(self, input_ids, labels, num_items):
        import torch

        if not self.warmed_up:
            # The first pass runs eagerly on the capture stream: it initializes what must not be initialized
            # while capturing (kernel compilation, library handles and workspaces), and it is real training.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                loss = self.loss(input_ids, labels, torch.as_tensor(num_items, device=input_ids.device))
                loss.backward()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.warmed_up = True
            return loss.detach()
        captured = self.graphs.get(tuple(input_ids.shape))
        if captured is None:
            captured = self.graphs[tuple(input_ids.shape)] = self._capture(input_ids)
        captured.input_ids.copy_(input_ids)
        captured.labels.copy_(labels)
        captured.num_items.copy_(torch.as_tensor(num_items))
        captured.graph.replay()
        for param, grad in zip(self.params, captured.grads):
            param.grad = grad
        return captured.loss.detach().clone()

    def _capture(self, example_ids) -> _Captured:
        import torch

        start = time.perf_counter()
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("a graphed training pass needs the gradients cleared (zero_grad) before it")
        input_ids = torch.zeros_like(example_ids)
        labels = torch.full_like(example_ids, -100)
        num_items = torch.ones((), dtype=torch.int64, device=example_ids.device)
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss = self.loss(input_ids, labels, num_items)
            loss.backward()
        torch.cuda.current_stream().wait_stream(self.stream)
        # Backward wrote each gradient into memory of the graph's pool: every replay refills the same tensors.
        grads = [p.grad for p in self.params]
        for param in self.params:
            param.grad = None
        self.capture_seconds += time.perf_counter() - start
        return _Captured(graph, input_ids, labels, num_items, loss, grads)
