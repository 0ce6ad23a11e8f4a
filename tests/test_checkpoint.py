"""Invariants 4-6 and the checkpoint format: round trip through transformers alone, mask token cases,
shift in the config, sharding and dtype."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import adapt
from adapt import AdaptError
from tiny_models import ARCHS, save_tiny_source

# A process in which `import adapt` fails: only transformers' remote-code path can load the checkpoint.
_REMOTE = textwrap.dedent("""
    import json, os, sys, tempfile, torch
    sys.modules["adapt"] = None
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    results = {}
    for path in sys.argv[2:]:
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        as_causal = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        assert type(as_causal).__name__ == "MaskedDiffusionLM", type(as_causal)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        if os.path.exists(os.path.join(path, "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # documented call: no prompt
            assert tokenizer.mask_token_id == model.config.mask_token_id
        ids = torch.arange(4, 14).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits
        out = model.diffusion_generate(ids[:, :4], max_new_tokens=6, steps=3)
        batch = torch.tensor([[0, 4, 5, 6], [7, 8, 9, 10]])  # row 0 left-padded
        pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
        caches = (None, "prefix", "dual") if model.supports_kv_cache() else (None,)  # sliding-window decoders refuse
        cached = {kv: model.diffusion_generate(batch, attention_mask=pad, max_new_tokens=6, steps=6, block_length=3,
                                               kv_cache=kv).tolist() for kv in caches}
        with tempfile.TemporaryDirectory() as resaved:
            model.save_pretrained(resaved)
            again = AutoModel.from_pretrained(resaved, trust_remote_code=True).eval()
            with torch.no_grad():
                assert torch.equal(again(ids).logits, logits), "save_pretrained round trip changed the logits"
        results[path] = {"logits": logits.tolist(), "mask_token_id": model.config.mask_token_id,
                         "gen_shape": list(out.shape), "gen_has_mask": bool((out == model.config.mask_token_id).any()),
                         "cached": cached}
    json.dump(results, open(sys.argv[1], "w"))
""")



def _load_remotely(tmp_path, paths):
    result_file = tmp_path / "remote.json"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reduction order as this process
    proc = subprocess.run([sys.executable, "-I", "-c", _REMOTE, str(result_file), *map(str, paths)],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    return json.loads(result_file.read_text())


def test_round_trip_transformers_alone_matches_adapt_load(converted, tmp_path):
    outs = {arch: converted(arch)[1] for arch in ARCHS}
    remote = _load_remotely(tmp_path, outs.values())
    ids = torch.arange(4, 14).unsqueeze(0)
    for arch, out in outs.items():
        model, _ = adapt.load(out)
        with torch.no_grad():
            local = model(ids).logits
        got = remote[str(out)]
        torch.testing.assert_close(torch.tensor(got["logits"]), local, atol=1e-5, rtol=0, msg=arch)
        assert got["mask_token_id"] == model.config.mask_token_id
        assert got["gen_shape"] == [1, 10] and not got["gen_has_mask"], arch
        batch = torch.tensor([[0, 4, 5, 6], [7, 8, 9, 10]])
        pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
        for kv, tokens in got["cached"].items():  # the KV-cache paths too run on transformers alone, unchanged
            kv = None if kv == "null" else kv
            ours = model.diffusion_generate(batch, attention_mask=pad, max_new_tokens=6, steps=6, block_length=3,
                                            kv_cache=kv)
            assert tokens == ours.tolist(), (arch, kv)


def test_config_records_diffusion_settings_and_provenance(converted):
    _, out = converted("llama")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "masked_diffusion_lm"
    assert config["text_config"]["model_type"] == "llama" and config["text_config"]["is_causal"] is False
    assert config["shift"] is True and config["bidirectional"] is True
    prov = config["provenance"]
    assert prov["converter"] == "dlm-adapt" and prov["converter_version"] == adapt.__version__
    assert prov["mask_token_case"] == "added" and prov["source"].endswith("src")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["mask_token_id"] == config["mask_token_id"] and gen["steps"] > 0
    assert {"configuration_masked_diffusion.py", "modeling_masked_diffusion.py"} <= {p.name for p in out.iterdir()}
    for f in ("configuration_masked_diffusion.py", "modeling_masked_diffusion.py"):
        imports = [ln for ln in (out / f).read_text().splitlines() if ln.startswith(("import ", "from "))]
        allowed = {"torch", "transformers", ""} | set(sys.stdlib_module_names)
        assert all(ln.split()[1].split(".")[0] in allowed for ln in imports), imports


def test_no_shift_is_stored_and_loaded(tmp_path):
    save_tiny_source(tmp_path / "src", "llama")
    adapt.convert(tmp_path / "src", tmp_path / "out", shift=False)
    model, _ = adapt.load(tmp_path / "out")
    assert model.config.shift is False


def _mask_case(out):
    return json.loads((out / "config.json").read_text())["provenance"]["mask_token_case"]


def test_mask_token_existing(tmp_path):
    save_tiny_source(tmp_path / "src", "llama", mask_token=True)
    adapt.convert(tmp_path / "src", tmp_path / "out")
    model, tok = adapt.load(tmp_path / "out")
    assert _mask_case(tmp_path / "out") == "existing"
    assert tok.mask_token == "<mask>" and model.config.mask_token_id == tok.mask_token_id == 100
    assert model.get_input_embeddings().weight.shape[0] == 101  # no resize


def test_mask_token_spare_row_reuses_padded_vocabulary(tmp_path):
    causal = save_tiny_source(tmp_path / "src", "qwen2", vocab_size=128)
    adapt.convert(tmp_path / "src", tmp_path / "out")
    model, tok = adapt.load(tmp_path / "out")
    assert _mask_case(tmp_path / "out") == "spare_row"
    assert model.config.mask_token_id == tok.mask_token_id == 100
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 128
    torch.testing.assert_close(emb, causal.get_input_embeddings().weight)  # untouched


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mask_token_added_resizes_with_mean_row(tmp_path, tie):
    causal = save_tiny_source(tmp_path / "src", "llama", tie=tie)
    adapt.convert(tmp_path / "src", tmp_path / "out")
    model, tok = adapt.load(tmp_path / "out")
    assert _mask_case(tmp_path / "out") == "added"
    assert tok.mask_token == "<|mask|>" and tok.mask_token_id == model.config.mask_token_id == 100
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == model.config.text_config.vocab_size == 101
    torch.testing.assert_close(emb[:100], causal.get_input_embeddings().weight)
    torch.testing.assert_close(emb[100], emb[:100].mean(0))
    assert (head is emb) == tie
    if not tie:
        torch.testing.assert_close(head[100], head[:100].mean(0))
        torch.testing.assert_close(head[:100], causal.get_output_embeddings().weight)


def test_mask_token_by_string_and_id(tmp_path):
    save_tiny_source(tmp_path / "src", "llama")
    adapt.convert(tmp_path / "src", tmp_path / "a", mask_token="w95")
    adapt.convert(tmp_path / "src", tmp_path / "b", mask_token="99")
    for out in ("a", "b"):
        model, tok = adapt.load(tmp_path / out)
        assert model.config.mask_token_id == tok.mask_token_id == 99 and _mask_case(tmp_path / out) == "specified"


@pytest.mark.parametrize("spec", ["<pad>", "3", "</s>", "<s>"])
def test_mask_token_equal_to_special_is_refused(tmp_path, spec):
    save_tiny_source(tmp_path / "src", "llama")
    with pytest.raises(AdaptError, match="mask token id .* is the (pad|eos|bos) token"):
        adapt.convert(tmp_path / "src", tmp_path / "out", mask_token=spec)
    assert not (tmp_path / "out").exists()


def test_sharded_source_stays_sharded_and_dtype_cast(tmp_path):
    causal = save_tiny_source(tmp_path / "src", "llama", max_shard_size="20KB")
    src_shards = sorted(p.name for p in (tmp_path / "src").glob("*.safetensors"))
    assert len(src_shards) > 1
    adapt.convert(tmp_path / "src", tmp_path / "out", dtype="bfloat16")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == src_shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert all(k.startswith("decoder.") for k in index["weight_map"])
    with safe_open(str(tmp_path / "out" / src_shards[0]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    model, _ = adapt.load(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    ids = torch.arange(4, 14).unsqueeze(0)
    with torch.no_grad():
        ref = causal.to(torch.bfloat16)(ids).logits
        got = model(ids, is_causal=True).logits[..., :100]
    torch.testing.assert_close(got, ref)


def test_overwrite_replaces_only_a_previous_conversion(tmp_path):
    save_tiny_source(tmp_path / "src", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for overwrite in (False, True):  # not ours: never replaced
        with pytest.raises(AdaptError, match="was not written by dlm-adapt"):
            adapt.convert(tmp_path / "src", out, overwrite=overwrite)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    adapt.convert(tmp_path / "src", out)  # an empty directory is fine
    with pytest.raises(AdaptError, match="already exists; pass --overwrite"):
        adapt.convert(tmp_path / "src", out, shift=False)
    adapt.convert(tmp_path / "src", out, overwrite=True, shift=False)
    assert json.loads((out / "config.json").read_text())["shift"] is False
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_generate_is_refused_and_diffusion_generate_fills_every_mask(converted):
    _, out = converted("qwen2")
    model, _ = adapt.load(out)
    with pytest.raises(TypeError, match="diffusion_generate"):
        model.generate(torch.tensor([[1, 5]]))
    prompts = torch.tensor([[3, 3, 1, 7, 8], [1, 9, 10, 11, 12]])
    mask = (prompts != 3).long()
    out_batch = model.diffusion_generate(prompts, attention_mask=mask, max_new_tokens=8, steps=4)
    assert out_batch.shape == (2, 13) and out_batch.dtype == torch.long
    assert not (out_batch == model.config.mask_token_id).any()
    assert torch.equal(out_batch[:, :5], prompts)
    alone = model.diffusion_generate(prompts[:1, 2:], max_new_tokens=8, steps=4)
    assert torch.equal(alone[0], out_batch[0, 2:])  # left padding does not change the tokens


def test_causal_lm_loader_cannot_silently_load_causal_model(converted):
    _, out = converted("llama")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)


def test_mask_token_string_in_vocabulary_is_registered(tmp_path):
    src = tmp_path / "src"
    save_tiny_source(src, "llama")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    tok.add_tokens(["<|mask|>"])  # present as an ordinary token, not declared as the mask token
    tok.save_pretrained(src)
    adapt.convert(src, tmp_path / "out", mask_token="auto")
    model, loaded = adapt.load(tmp_path / "out")
    assert loaded.mask_token == "<|mask|>" and loaded.mask_token_id == model.config.mask_token_id == 100
    assert _mask_case(tmp_path / "out") == "existing"
    assert model.get_input_embeddings().weight.shape[0] == 101  # the token had no embedding row yet


def test_save_pretrained_of_a_loaded_model_still_loads_with_transformers_alone(converted, tmp_path):
    _, out = converted("gemma3_text")
    model, _ = adapt.load(out)
    model.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    got = _load_remotely(tmp_path, [tmp_path / "resaved"])[str(tmp_path / "resaved")]
    with torch.no_grad():
        local = model(torch.arange(4, 14).unsqueeze(0)).logits
    torch.testing.assert_close(torch.tensor(got["logits"]), local, atol=1e-5, rtol=0)
