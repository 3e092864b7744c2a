"""A local or hub model in safetensors is copied as it is (sources._copy_checkpoint): its weight files byte for
byte, in their own dtype, after its config, architecture, weight files and tokenizer are checked; what is not
a full-precision causal LM that transformers implements is refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_pipeline.config import ModelParams
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.sources import byte_tokenizer, fetch_model, random_model


def local(path: Path) -> ModelParams:
    return ModelParams("local", str(path), "main", False, False)


@pytest.fixture(scope="module")
def bf16_sources(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Random tiny models saved in bfloat16, as hub checkpoints usually are (GPT-2: one file, tied head; Llama:
    four shards and their index), with the number of parameters of each."""
    tokenizer = byte_tokenizer()
    sources = {}
    for name, shard in (("tiny-gpt2", None), ("tiny-llama", "60KB")):
        model = random_model(name, 7, tokenizer, dtype="bfloat16")
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
        tokenizer.save_pretrained(out)
        sources[name] = out, model.num_parameters()
    return sources


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_safetensors_source_is_copied_as_it_is(tmp_path, bf16_sources, name):
    import torch
    from safetensors.torch import load_file

    from qlora_pipeline.config import QuantizeParams
    from qlora_pipeline.quantization import load_model

    source, parameters = bf16_sources[name]
    record = fetch_model(local(source), 0, tmp_path)
    weights = sorted(p.name for p in source.glob("model*.safetensors*"))
    assert len(weights) == (1 if name == "tiny-gpt2" else 5)  # the Llama: four shards and the index
    for file in weights + ["generation_config.json"]:
        assert (tmp_path / file).read_bytes() == (source / file).read_bytes(), file
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["pad_token_id"] == 256
    assert record["parameters"] == parameters and record["dtype"] == "bfloat16"
    assert record["architecture"] == config["architectures"][0] == ("GPT2LMHeadModel" if name == "tiny-gpt2" else "LlamaForCausalLM")
    # The stages load it in the dtype they ask for: the bfloat16 values, exactly, as a float32 copy held them.
    model = load_model(tmp_path, QuantizeParams(False, "nf4", True, "auto"), "cpu", torch.float32)
    stored = {k: v for file in source.glob("*.safetensors") for k, v in load_file(file).items()}
    for key, param in model.state_dict().items():
        if key in stored:
            assert param.dtype == torch.float32 and torch.equal(param, stored[key].float()), key


def edited_source(source: Path, dest: Path, change) -> Path:
    shutil.copytree(source, dest)
    change(dest)
    return dest


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BAD_SOURCES = {
    "pre-quantized": ("tiny-gpt2", lambda d: edit_json(d / "config.json", lambda c: c.update(
        quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})),
        "its weights are already quantized (config.json quantization_config: bitsandbytes)"),
    "remote code": ("tiny-gpt2", lambda d: edit_json(d / "config.json", lambda c: c.update(
        model_type="acme-custom", auto_map={"AutoConfig": "configuration_acme.AcmeConfig"})),
        "config.json: "),
    "no causal LM": ("tiny-gpt2", lambda d: edit_json(d / "config.json", lambda c: c.update(model_type="vit")),
                     "transformers has no causal language model for model_type 'vit'"),
    "index leaves the directory": ("tiny-llama", lambda d: edit_json(d / "model.safetensors.index.json", lambda i: i[
        "weight_map"].update({"lm_head.weight": "../model-00001-of-00004.safetensors"})),
        "weight_map names '../model-00001-of-00004.safetensors', not a .safetensors file beside the index"),
    "shard missing": ("tiny-llama", lambda d: (d / "model-00002-of-00004.safetensors").unlink(),
                      "weight_map names model-00002-of-00004.safetensors, which is not in"),
    "truncated": ("tiny-gpt2", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
                  "model.safetensors: not a complete safetensors file"),
    "weights under another name": ("tiny-gpt2", lambda d: (d / "model.safetensors").rename(d / "consolidated.safetensors"),
                                   "no model.safetensors or model.safetensors.index.json (transformers loads no other "
                                   "safetensors file: consolidated.safetensors)"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_safetensors_source_is_refused_before_any_copy(tmp_path, bf16_sources, case):
    name, change, message = BAD_SOURCES[case]
    source = edited_source(bf16_sources[name][0], tmp_path / "source", change)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PipelineError) as refused:
        fetch_model(local(source), 0, out)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not list(out.iterdir())
