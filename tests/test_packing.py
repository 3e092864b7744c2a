"""Packed passes compute what padded passes compute: the same loss and LoRA gradients, within float32
rounding, on tiny random Llama and GPT-2 models in 4 bit (bitsandbytes on the CPU), for completion-only labels
and labels on every token (where the first token of each row must not be predicted from the row before)."""

from __future__ import annotations

import pytest
import torch

from qlora_pipeline.config import LoraParams, ModelParams, QuantizeParams
from qlora_pipeline.packing import pack, sorted_passes, use_packed_attention
from qlora_pipeline.quantization import load_model, lora_config, resolve_target_modules
from qlora_pipeline.sources import fetch_model


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    fetch_model(ModelParams("random", request.param, "main", False, False), 0, out)
    return out


def rows(train_on_all: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in (7, 19, 3, 12):
        ids = torch.randint(0, 256, (length,), generator=generator).tolist()
        prompt = 0 if train_on_all else length // 2
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def loss_and_grads(model, batch) -> tuple[float, list[torch.Tensor]]:
    labels = batch.pop("labels")
    logits = model(**batch).logits.float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (targets != -100).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.item(), torch.autograd.grad(loss, params)


def padded(examples, pad_id):
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id)
    labels = torch.full((len(examples), longest), -100)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        labels[i, :len(e["labels"])] = torch.tensor(e["labels"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("train_on_all", [False, True], ids=["completion", "all"])
def test_packed_pass_gives_the_padded_loss_and_gradients(model_dir, train_on_all):
    from peft import get_peft_model

    quantize = QuantizeParams(True, "nf4", True, "float32")
    lora = LoraParams(4, 8.0, 0.0, "auto")
    torch.manual_seed(0)
    model = load_model(model_dir, quantize, "cpu", torch.float32)
    model = get_peft_model(model, lora_config(lora, resolve_target_modules(model, lora)))
    for name, param in model.named_parameters():   # LoRA B starts at zero: give the gradients something to see
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    examples = rows(train_on_all)
    want_loss, want_grads = loss_and_grads(model, padded(examples, 0))
    use_packed_attention(model)
    batch = pack(examples, 0, pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (1, 48) and batch["cu_seq_lens_q"].tolist() == [0, 7, 26, 29, 41, 48]
    got_loss, got_grads = loss_and_grads(model, batch)
    with pytest.raises(RuntimeError, match="cu_seq_lens_q"):   # the packed attention is the one in use
        model(input_ids=batch["input_ids"])
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_pack_masks_each_rows_first_label_and_restarts_positions():
    batch = pack([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}], 0, 4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8] and batch["max_length_q"] == 3


def test_sorted_passes_run_a_step_shortest_rows_first_and_a_one_pass_step_as_two():
    inf = float("inf")
    assert sorted_passes([30, 10, 20, 40], inf, 10) == ([1, 2, 0, 3], [2, 2])
    assert sorted_passes([5, 1, 3], inf, 10) == ([1, 2, 0], [1, 2])
    assert sorted_passes([7], inf, 10) == ([0], [1])
    # Split by the bounds already (the longest row times the rows, at most 200 tokens): not halved again.
    assert sorted_passes([100, 10, 90, 20], 200, 10) == ([1, 3, 2, 0], [2, 2])
    assert sorted_passes([100, 10, 90, 20, 15], inf, 2) == ([1, 4, 3, 2, 0], [2, 2, 1])


def test_collator_by_length_computes_fewer_pads_for_the_same_rows_and_targets():
    """The same step collated in order and by length: the same rows, real and trained tokens (the loss and its
    normalization), fewer computed tokens."""
    from qlora_pipeline.trainer import PASSES, TokenCountingCollator

    step = rows(False) * 2   # lengths 7, 19, 3, 12 twice
    counts, row_sets = {}, {}
    for by_length in (False, True):
        collator = TokenCountingCollator(0, by_length=by_length)
        batch = collator(step)
        collator.count_next()
        counts[by_length] = (collator.real_tokens, collator.trained_tokens, collator.padded_tokens, collator.passes)
        row_sets[by_length] = sorted(tuple(row[mask].tolist()) for p in batch[PASSES]
                                     for row, mask in zip(p["input_ids"], p["attention_mask"].bool()))
        assert (batch["labels"][:, 1:] != -100).sum() == collator.trained_tokens
    assert row_sets[True] == row_sets[False] == sorted(tuple(r["input_ids"]) for r in step)
    assert counts[False] == (82, 44, 8 * 19, 1)
    assert counts[True] == (82, 44, 4 * 7 + 4 * 19, 2)   # 3, 3, 7, 7 | 12, 12, 19, 19
