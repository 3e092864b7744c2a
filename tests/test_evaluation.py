"""The evaluate stage's scoring on its own: the answer loss over the answer positions only, and the attention
kernels inference leaves out on a GPU."""

import pytest


def test_answer_loss_is_the_mean_over_answer_tokens_of_the_whole_logits(tiny_model_dir):
    """Only the answer positions' logits are converted to float32 (an 8 B model's whole batch would be 3.2 GB):
    the loss is the one computed over the whole logits with the prompt and padding positions ignored."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.evaluation import answer_loss
    from qlora_pipeline.tokenization import IGNORE_INDEX

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (5, 9, 14, 7, 11):
        ids = torch.randint(0, 200, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2:]})
    scored = answer_loss(model, rows, 0, 2, "cpu")

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:   # one row at a time: no padding at all
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(row["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    assert scored["answer_tokens"] == count == sum(len(r["input_ids"]) - len(r["input_ids"]) // 2 for r in rows)
    assert scored["loss"] == pytest.approx(total / count, abs=2e-6)


@pytest.mark.parametrize("device, calls", [("cuda", [False]), ("cpu", [])])
def test_inference_leaves_cudnn_attention_out_on_a_gpu(monkeypatch, device, calls):
    import torch

    from qlora_pipeline.evaluation import use_inference_attention

    seen = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", seen.append)
    use_inference_attention(device)
    assert seen == calls
