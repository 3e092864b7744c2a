"""Greedy decoding through the static cache (decoding.py): the steps a GPU replays from a CUDA graph, run eagerly
here, give transformers' generate's tokens; and the models it is not used for. The graphed replay itself needs a
GPU (skipped in CI); run on the GPU machine with `pytest tests/test_decoding.py`."""

import pytest
import torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _left_padded_batch(vocab: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    lengths = (9, 4, 12, 7)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.randint(3, vocab, (length,), generator=generator)
        mask[row, -length:] = 1
    return ids, mask


@pytest.mark.parametrize("architecture", ["tiny-gpt2", "tiny-llama"])
def test_static_steps_give_generates_tokens_with_eos_and_padding(architecture):
    """Left-padded rows of different lengths; EOS ids that rows produce partway, so that rows finish at different
    steps (pad after EOS), then all of them early (decoding stops)."""
    import torch

    from qlora_pipeline.decoding import _StaticDecoder
    from qlora_pipeline.sources import random_model

    model = random_model(architecture, 0).eval()
    ids, mask = _left_padded_batch(model.config.vocab_size)
    new = 20

    def generate(eos) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
        return out[:, ids.shape[1]:]

    def static(eos) -> torch.Tensor:
        return _StaticDecoder(model, ids, mask, new, eos, 0).run(graphed=False)

    with torch.no_grad():
        free_running = generate(eos=model.config.vocab_size + 5)   # an id no step produces: all 20 tokens
        assert free_running.shape == (4, new)
        assert torch.equal(static(model.config.vocab_size + 5), free_running)
        # A token row 0 produces at step 5: that row finishes there, the others later or never.
        eos = int(free_running[0, 5])
        expected = generate(eos)
        assert (expected == 0).any() and torch.equal(static(eos), expected)
        # Every row's fourth token an EOS id (a list, as generate takes): every row has finished by then, and
        # decoding stops there (a GPU checks every 8 tokens; the columns after the last EOS are not returned).
        every_row = sorted({int(t) for t in free_running[:, 3]})
        expected = generate(every_row)
        assert expected.shape[1] <= 4 and torch.equal(static(every_row), expected)


def test_models_decoding_does_not_take_say_why():
    from qlora_pipeline.decoding import static_decoding_unsupported
    from qlora_pipeline.sources import random_model

    model = random_model("tiny-llama", 0)
    assert static_decoding_unsupported(model, "cpu") == "not a GPU"
    assert static_decoding_unsupported(model, "cuda") is None
    model.generation_config.repetition_penalty = 1.3
    assert static_decoding_unsupported(model, "cuda") == "its generation_config sets repetition_penalty"
    windowed = random_model("tiny-llama", 0, model_type="mistral", sliding_window=16)
    assert static_decoding_unsupported(windowed, "cuda") == "some attention layers see a sliding window"


@gpu
@pytest.mark.parametrize("architecture", ["tiny-gpt2", "tiny-llama"])
def test_graph_replays_are_the_eager_steps(architecture):
    """On a GPU: the tokens replayed from the captured step are the tokens of the same steps run eagerly (with a
    row that finishes early and one that never does), in bfloat16 as evaluation runs."""
    from qlora_pipeline.decoding import _StaticDecoder, greedy_generate
    from qlora_pipeline.sources import random_model

    model = random_model(architecture, 0, device="cuda", dtype="bfloat16").eval()
    ids, mask = (t.cuda() for t in _left_padded_batch(model.config.vocab_size))
    with torch.no_grad():
        eager = _StaticDecoder(model, ids, mask, 24, model.config.vocab_size + 5, 0).run(graphed=False)
        eos = int(eager[1, 6])
        eager = _StaticDecoder(model, ids, mask, 24, eos, 0).run(graphed=False)
        graphed = greedy_generate(model, ids, mask, 24, eos, 0)
    assert (eager == 0).any() and torch.equal(graphed, eager)
