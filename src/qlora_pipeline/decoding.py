"""Greedy generation on a GPU: a static key/value cache, and each new token replayed from one CUDA graph.

Why: a model generates a token at a time, and each token is bound by the CPU issuing the forward pass's kernels
one by one, as a training step was (cuda_graphs.py). On an H200, 16 rows (bench/decode_speed.py): distilgpt2 took
4.35 ms a token through transformers' generate and 0.83 ms replayed; the 8 B shape 27.7 and 11.3 ms in bfloat16,
100.8 and 27.2 ms with 4-bit layers and an adapter (the trained model evaluate scores).

What is computed is transformers' own greedy decoding with its static cache (`generate(cache_implementation=
"static")`): the prompts' pass fills the cache, then each step runs the model on every row's last token, attending
to the cache slots written so far (a 4D mask, so that no step depends on values the host would have to read);
a row that produced EOS gets the pad token from then on, and decoding stops once every row has (seen every 8
tokens; the columns after the last row's EOS are not returned, as generate returns none). Attention spans
the whole cache with the unwritten slots masked, where generate's dynamic cache spans only the written ones: the
same function, rounded differently. In float32 both decodings give the same 16 rows; in bfloat16 so does the 8 B
shape, while random distilgpt2, whose near-flat logits make near-ties, agrees on 7 to 10 rows of 16 over 64
tokens. On the CPU there is no launch cost to save, and generation stays transformers' generate
(static_decoding_unsupported says for which models too).
"""

from __future__ import annotations

import copy
import inspect

# generation_config fields that make greedy decoding more than the argmax of each step's logits (logits processors,
# stopping criteria). A model whose generation_config sets one of them generates with transformers' generate.
_PROCESSORS = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
               "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "min_length", "min_new_tokens",
               "sequence_bias", "exponential_decay_length_penalty", "encoder_repetition_penalty",
               "encoder_no_repeat_ngram_size", "guidance_scale", "watermarking_config", "stop_strings",
               "remove_invalid_values", "max_time")
# Rows still generating are checked on the host every this many tokens: each check waits for the GPU.
_CHECK_EVERY = 8


def _base(model):
    """The transformers model under a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def static_decoding_unsupported(model, device: str) -> str | None:
    """Why `model` does not generate through the static cache and a CUDA graph on `device`, or None when it does."""
    from transformers import GenerationConfig
    from transformers.generation import GenerationMode

    if not device.startswith("cuda"):
        return "not a GPU"
    base = _base(model)
    config = base.config.get_text_config()
    if config.is_encoder_decoder or not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} has no static key/value cache"
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "some attention layers see a sliding window"
    if config._attn_implementation != "sdpa":   # the step's boolean 4D mask is what sdpa takes as it is
        return f"attention implementation {config._attn_implementation}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = str(rope.get("rope_type", rope.get("type", ""))) if isinstance(rope, dict) else ""
    if "dynamic" in rope_type or "longrope" in rope_type:   # their frequencies follow the length, read on the host
        return f"rope_type {rope_type}"
    greedy = copy.deepcopy(base.generation_config)
    greedy.update(do_sample=False, num_beams=1)
    mode = greedy.get_generation_mode()
    if mode != GenerationMode.GREEDY_SEARCH:   # constraints, contrastive, assisted, ...
        return f"its generation_config asks for {mode.value}"
    default = GenerationConfig()
    for name in _PROCESSORS:
        if getattr(base.generation_config, name, None) != getattr(default, name, None):
            return f"its generation_config sets {name}"
    return None


def decoding_method(model, device: str) -> tuple[bool, str]:
    """Whether `model` generates on `device` through the static cache and a CUDA graph, and how it generates, in
    words (recorded in metrics/eval.json)."""
    why_not = static_decoding_unsupported(model, device)
    return why_not is None, "static cache, CUDA graph" if why_not is None else f"transformers generate ({why_not})"


def greedy_generate(model, input_ids, attention_mask, max_new_tokens: int, eos_token_id: int | list[int],
                    pad_token_id: int, static: bool):
    """The greedy continuation of left-padded rows: the new tokens only, pad after a row's EOS. static: through the
    static cache and a CUDA graph (where static_decoding_unsupported finds nothing against it), else transformers'
    generate."""
    import torch

    with torch.no_grad():
        if static and max_new_tokens > 0:
            return _StaticDecoder(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id).run()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
        return out[:, input_ids.shape[1]:]


class _StaticDecoder:
    """One batch's greedy decoding: the prompts' pass, then one step function (model on the last tokens, argmax,
    EOS bookkeeping) captured once in a CUDA graph and replayed for every further token. Everything a step reads
    or writes lives in tensors allocated here, which the graph's replays update in place. Capturing waits for the
    GPU and empties PyTorch's cache of free blocks once a batch (torch.cuda.graph)."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens: int, eos_token_id: int | list[int],
                 pad_token_id: int):
        import torch
        from transformers import StaticCache

        rows, prompt_length = input_ids.shape
        device = input_ids.device
        self.model, self.max_new_tokens = model, max_new_tokens
        base = _base(model)
        forward = inspect.signature(base.forward).parameters
        # transformers 5 renames the forward's past_key_values to cache (5.24 warns at every call of the old name).
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"
        # Only the last position's logits, as generate asks: a prompt pass's whole logits would be rows x length x
        # vocabulary (0.8 GB for 16 rows of 200 tokens on a 128k vocabulary in bfloat16).
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self.cache = StaticCache(config=base.config, max_cache_len=prompt_length + max_new_tokens)
        self.prompt_ids, self.prompt_mask = input_ids, attention_mask
        # Positions as generate gives left-padded rows: counted from each row's first real token (pads: 0, masked).
        self.prompt_positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.eos = torch.tensor([eos_token_id], device=device).flatten()
        self.pad = torch.tensor(pad_token_id, device=device)
        # The step's static inputs and state.
        self.last_token = torch.empty(rows, 1, dtype=torch.long, device=device)
        self.position = self.prompt_positions[:, -1:] + 1
        self.slot = torch.tensor([prompt_length], device=device)   # the cache slot the step writes
        self.visible = torch.zeros(rows, 1, 1, prompt_length + max_new_tokens, dtype=torch.bool, device=device)
        self.visible[:, 0, 0, :prompt_length] = attention_mask.bool()
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)

    def _forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, **{self.cache_argument: self.cache}, **self.last_logits_only).logits[:, -1]

    def _choose(self, logits):
        """The step's tokens (pad for finished rows), and the finished rows updated; the next step's input."""
        import torch

        token = torch.where(self.finished, self.pad, logits.argmax(-1))
        self.finished |= torch.isin(token, self.eos)
        self.last_token.copy_(token[:, None])
        return token

    def _step(self):
        self.visible.index_fill_(-1, self.slot, True)
        token = self._choose(self._forward(self.last_token, self.visible, self.position))
        self.position.add_(1)
        self.slot.add_(1)
        return token

    def run(self, graphed: bool = True):
        """The new tokens, [rows, columns]. graphed=False runs every step eagerly (the same steps, on any device)."""
        import torch

        tokens = [self._choose(self._forward(self.prompt_ids, self.prompt_mask, self.prompt_positions))]
        done_after = [self.finished.all()]
        graph = captured = None
        stream = torch.cuda.Stream() if graphed else None
        while len(tokens) < self.max_new_tokens:
            if len(tokens) % _CHECK_EVERY == 0 and bool(done_after[-1]):
                break
            if not graphed:
                token = self._step()
            elif graph is None:
                # The first step runs eagerly and the second is captured, both on a side stream as capturing needs
                # (so the libraries' lazy set-up, cuBLAS workspaces and the like, is done on that stream first).
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    if len(tokens) == 1:
                        token = self._step()
                    else:
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, stream=stream):   # records the step; it runs at each replay
                            captured = self._step()
                torch.cuda.current_stream().wait_stream(stream)
            if graph is not None:
                graph.replay()
                token = captured.clone()
            tokens.append(token)
            done_after.append(self.finished.all())
        # As generate: the columns up to the one where the last row finished.
        first_done = torch.stack(done_after).nonzero()
        length = int(first_done[0]) + 1 if len(first_done) else len(tokens)
        return torch.stack(tokens[:length], 1)
