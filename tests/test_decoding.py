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


@pytest.mark.parametrize("new", [1, 2, 3])
def test_the_shortest_generations_are_generates(new):
    """One token (the prompts' pass alone), two (one step), three."""
    from qlora_pipeline.decoding import _StaticDecoder
    from qlora_pipeline.sources import random_model

    model = random_model("tiny-llama", 0).eval()
    ids, mask = _left_padded_batch(model.config.vocab_size)
    never = model.config.vocab_size + 5
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=0, eos_token_id=never)[:, ids.shape[1]:]
        assert torch.equal(_StaticDecoder(model, ids, mask, new, never, 0).run(graphed=False), expected)


def test_an_adapter_model_decodes_as_generate_does():
    """A peft model (the trained model evaluate scores): its base's cache and forward arguments, the adapter applied."""
    from peft import LoraConfig, get_peft_model

    from qlora_pipeline.decoding import _StaticDecoder, static_decoding_unsupported
    from qlora_pipeline.sources import random_model

    torch.manual_seed(0)
    model = get_peft_model(random_model("tiny-llama", 0), LoraConfig(r=4, target_modules="all-linear",
                                                                     init_lora_weights=False)).eval()
    ids, mask = _left_padded_batch(300)
    assert static_decoding_unsupported(model, "cuda") is None
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, eos_token_id=305)[:, ids.shape[1]:]
        assert torch.equal(_StaticDecoder(model, ids, mask, 12, 305, 0).run(graphed=False), expected)


@pytest.mark.parametrize("change, reason", [
    ({"repetition_penalty": 1.3}, "its generation_config sets repetition_penalty"),
    ({"num_beams": 4}, None),   # evaluation asks for greedy decoding (num_beams=1) on either path
    ({"penalty_alpha": 0.6, "top_k": 4}, "its generation_config asks for contrastive_search"),
    ({"prompt_lookup_num_tokens": 5}, "its generation_config asks for assisted_generation"),
])
def test_generation_configs_that_are_not_plain_greedy_keep_generate(change, reason):
    from qlora_pipeline.decoding import static_decoding_unsupported
    from qlora_pipeline.sources import random_model

    model = random_model("tiny-llama", 0)
    for key, value in change.items():
        setattr(model.generation_config, key, value)
    assert static_decoding_unsupported(model, "cuda") == reason


def test_models_static_decoding_does_not_fit_are_named():
    from qlora_pipeline.decoding import decoding_method, static_decoding_unsupported
    from qlora_pipeline.sources import random_model

    model = random_model("tiny-llama", 0)
    assert decoding_method(model, "cpu") == (False, "transformers generate (not a GPU)")
    assert decoding_method(model, "cuda") == (True, "static cache, CUDA graph")
    windowed = random_model("tiny-llama", 0, model_type="mistral", sliding_window=16)
    assert static_decoding_unsupported(windowed, "cuda") == "some attention layers see a sliding window"
    dynamic = random_model("tiny-llama", 0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert static_decoding_unsupported(dynamic, "cuda") == "rope_type dynamic"
    model.config._attn_implementation = "eager"
    assert static_decoding_unsupported(model, "cuda") == "attention implementation eager"


@gpu
@pytest.mark.parametrize("architecture", ["tiny-gpt2", "tiny-llama"])
def test_graph_replays_are_the_eager_steps(architecture):
    """On a GPU, in bfloat16 as evaluation runs: the tokens replayed from the captured step are the tokens of the
    same steps run eagerly, with a row that finishes early and others that never do, with every row finishing at
    the second token (before the capture), and for 1 to 3 tokens."""
    from qlora_pipeline.decoding import _StaticDecoder
    from qlora_pipeline.sources import random_model

    model = random_model(architecture, 0, device="cuda", dtype="bfloat16").eval()
    ids, mask = (t.cuda() for t in _left_padded_batch(model.config.vocab_size))
    never = model.config.vocab_size + 5
    with torch.no_grad():
        free = _StaticDecoder(model, ids, mask, 24, never, 0).run(graphed=False)
        for new, eos in [(24, int(free[1, 6])), (24, sorted({int(t) for t in free[:, 1]})), (1, never), (2, never),
                         (3, never)]:
            eager = _StaticDecoder(model, ids, mask, new, eos, 0).run(graphed=False)
            assert torch.equal(_StaticDecoder(model, ids, mask, new, eos, 0).run(), eager), (new, eos)
