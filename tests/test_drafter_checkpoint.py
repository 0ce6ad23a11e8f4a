"""`dlm-adapt convert SRC OUT --drafter --block-size K`: one directory with the parent's weights, untouched, plus a
drafter adapter (LoRA + [MASK] row) that the shipped code applies without peft; adapter off, the logits are the
parent's exactly; the checkpoint decodes speculatively with transformers alone (no `adapt`, no `peft`)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import adapt
from adapt.checkpoint import validate
from adapt.cli import main
from adapt.model.drafter_masked_diffusion import drafting
from tiny_models import save_tiny_source

ARCHS = ("llama", "gpt2", "qwen3_moe", "gemma3_text")  # Linear, Conv1D, MoE router, sliding + full layers
PROMPT = [11, 12, 13, 14, 15]


def _tensors(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"drafter-{arch}")
            source = save_tiny_source(root / "src", arch)
            plain = adapt.convert(root / "src", root / "block", block_size=4)
            drafter = adapt.convert(root / "src", root / "drafter", block_size=4, drafter=True, drafter_rank=4)
            cache[arch] = root / "src", source, plain, drafter
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_parent_weights_untouched_plus_the_adapter(drafters, arch):
    _, _, plain, drafter = drafters(arch)
    block, both = _tensors(plain), _tensors(drafter)
    adapter = {name: t for name, t in both.items() if name.startswith("drafter.")}
    assert {name: t for name, t in both.items() if name not in adapter}.keys() == block.keys()
    for name, t in block.items():
        assert torch.equal(both[name], t), name
    assert "drafter.mask_delta" in adapter and any(name.endswith(".A") for name in adapter)
    assert all(not t.any() for name, t in adapter.items() if not name.endswith(".A"))  # untrained: B, delta zero
    extra = sum(t.numel() * t.element_size() for t in adapter.values())
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert extra <= size(drafter) - size(plain) < extra + 4096  # the parent's plus the adapter's (and its header)
    config = json.loads((drafter / "config.json").read_text())
    assert config["block_size"] == 4 and config["drafter"]["rank"] == 4 and config["drafter"]["targets"]
    assert config["drafter"]["reads"] == "parent_cache"
    assert {"speculative_masked_diffusion.py", "drafter_masked_diffusion.py"} <= {p.name for p in drafter.iterdir()}
    assert validate(drafter).parameters == sum(t.numel() for t in both.values())  # what `push` checks


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_off_is_the_parent_and_on_is_the_drafter(drafters, arch):
    src, _, _, drafter = drafters(arch)
    causal = AutoModelForCausalLM.from_pretrained(src).eval()
    model, _ = adapt.load(drafter)
    stored = {name: t for name, t in _tensors(drafter).items() if name.startswith("drafter.")}
    loaded = {f"drafter.{name}": t for name, t in model.drafter.state_dict().items()}
    assert loaded.keys() == stored.keys() and all(torch.equal(loaded[n], stored[n]) for n in stored)
    with torch.no_grad():
        for p in model.drafter.parameters():  # a trained adapter: every tensor nonzero
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        x = torch.tensor([PROMPT + [20, 21, 22]])
        ref = causal(x).logits
        parent = model(x, is_causal=True).logits
        block = model(x).logits
        with drafting(model):
            drafted = model(x).logits
            masked = model(torch.tensor([PROMPT + [model.config.mask_token_id] * 3])).logits
        after = model(x, is_causal=True).logits
    assert torch.equal(parent[..., : ref.shape[-1]], ref) or torch.allclose(parent[..., : ref.shape[-1]], ref,
                                                                            atol=1e-5, rtol=0)
    assert torch.equal(after, parent)  # leaving `drafting` turns the adapter off again
    assert torch.equal(drafted, block)  # gated: without a [MASK] token the adapter changes nothing
    with torch.no_grad():
        delta = model.drafter.mask_delta.clone()
        model.drafter.mask_delta.zero_()
        with drafting(model):
            no_row = model(torch.tensor([PROMPT + [model.config.mask_token_id] * 3])).logits
        model.drafter.mask_delta.copy_(delta)
        for pair in model.drafter.lora.values():
            pair.B.zero_()
        with drafting(model):
            no_lora = model(torch.tensor([PROMPT + [model.config.mask_token_id] * 3])).logits
    assert not torch.allclose(masked, no_row, atol=1e-4)  # the [MASK] row acts
    assert not torch.allclose(masked, no_lora, atol=1e-4)  # the LoRA acts (at the masks)


_ALONE = textwrap.dedent("""
    import json, sys, torch
    sys.modules["adapt"] = None  # neither dlm-adapt nor peft can be imported: transformers alone
    sys.modules["peft"] = None
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    out = model.diffusion_generate(torch.tensor([json.loads(sys.argv[3])]), max_new_tokens=10, speculative=True,
                                   return_dict_in_generate=True)
    json.dump({"tokens": out.sequences[0].tolist(), "nfe": out.nfe,
               "adapter": sorted(n for n, _ in model.named_parameters() if n.startswith("drafter."))[:1]},
              open(sys.argv[1], "w"))
""")


def test_decodes_speculatively_with_transformers_alone(drafters, tmp_path):
    _, source, _, drafter = drafters("llama")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = tmp_path / "alone.json"
    proc = subprocess.run([sys.executable, "-I", "-c", _ALONE, str(result), str(drafter), json.dumps(PROMPT)],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["adapter"] and got["nfe"] >= 2
    ids = torch.tensor([PROMPT])
    ar = source.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                         pad_token_id=3)[0].tolist()
    eos = source.generation_config.eos_token_id
    new, want = got["tokens"][len(PROMPT):], ar[len(PROMPT):]
    cut = lambda t: t[: t.index(eos) + 1] if eos in t else t  # noqa: E731
    assert cut(new) == cut(want)


def test_drafter_without_block_size_is_one_clear_error(tmp_path, capsys):
    save_tiny_source(tmp_path / "src", "llama")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--drafter"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--drafter drafts blocks: give the draft block size with --block-size" in err[0]
    assert not (tmp_path / "out").exists()


def test_generate_speculative_from_the_cli_and_the_python_api(drafters, capsys):
    _, source, _, drafter = drafters("llama")
    capsys.readouterr()
    assert main(["generate", str(drafter), "--prompt", "w7 w8 w9", "--max-new-tokens", "8", "--speculative",
                 "--draft-length", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["rounds"] >= 1 and row["nfe"] == row["rounds"] + 1 and len(row["acceptance"]) == 3
    model, tokenizer = adapt.load(drafter)
    ids = tokenizer(["w7 w8 w9"], return_tensors="pt").input_ids
    ar = source.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                         pad_token_id=3)[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    assert row["tokens"] == (ar[: ar.index(eos)] if eos in ar else ar)  # the parent's greedy text
    api = adapt.generate(model, ["w7 w8 w9"], tokenizer=tokenizer, max_new_tokens=8, speculative=True,
                                  draft_length=3)
    assert api[0]["tokens"] == row["tokens"] and api[0]["acceptance"] == row["acceptance"]
    # the same settings as one SamplingOptions; a keyword beside it replaces its field
    options = adapt.SamplingOptions(max_new_tokens=8, speculative=True, draft_length=2)
    assert adapt.generate(model, ["w7 w8 w9"], tokenizer=tokenizer, sampling=options, draft_length=3) == api


SPECULATIVE_ERRORS = {
    "draft length 0": (["--speculative", "--draft-length", "0"], "--draft-length must be at least 1"),
    "draft length alone": (["--draft-length", "2"], "--draft-length is the speculative drafter's: add --speculative"),
    "no guessing alone": (["--no-guess-bonus"], "--no-guess-bonus is the speculative drafter's: add --speculative"),
    "infill": (["--speculative", "--infill", "w1 <|mask|> w3"], "--infill fills holes, --speculative continues"),
    "no drafter": (["--speculative"], "speculative decoding needs a drafter, and this checkpoint has none; convert the causal source with --drafter"),
    "diffusion option": (["--speculative", "--threshold", "0.9"], "it has no diffusion steps: leave threshold unset"),
}


@pytest.mark.parametrize("case", SPECULATIVE_ERRORS)
def test_bad_speculative_input_is_one_clear_line(drafters, converted, capsys, case):
    flags, message = SPECULATIVE_ERRORS[case]
    checkpoint = converted("llama")[1] if case == "no drafter" else drafters("llama")[3]
    capsys.readouterr()
    prompt = [] if "--infill" in flags else ["--prompt", "w1 w2"]
    assert main(["generate", str(checkpoint), *prompt, "--max-new-tokens", "4", *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dlm-adapt")]  # not progress bars
    assert len(err) == 1 and err[0].startswith("dlm-adapt: error: ") and message in err[0], err


def test_drafter_designs(drafters, tmp_path, capsys):
    """A 0.5.1 drafter (no `reads` in config.drafter; its adapter untrained) decodes as the parent, as every drafter
    does; a design this code does not run is one line naming the upgrade."""
    import shutil

    _, source, _, drafter = drafters("llama")
    for name, reads in (("old", None), ("future", "some_other_cache")):
        copy = tmp_path / name
        shutil.copytree(drafter, copy)
        config = json.loads((copy / "config.json").read_text())
        config["drafter"].pop("reads")
        if reads:
            config["drafter"]["reads"] = reads
        (copy / "config.json").write_text(json.dumps(config))
        capsys.readouterr()
        code = main(["generate", str(copy), "--prompt", "w7 w8 w9", "--max-new-tokens", "8", "--speculative",
                     "--json"])
        captured = capsys.readouterr()
        if reads is None:
            model, tokenizer = adapt.load(drafter)
            ids = tokenizer(["w7 w8 w9"], return_tensors="pt").input_ids
            ar = source.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 pad_token_id=3)[0, ids.shape[1]:].tolist()
            eos = tokenizer.eos_token_id
            assert code == 0 and json.loads(captured.out)["tokens"] == (ar[: ar.index(eos)] if eos in ar else ar)
        else:
            err = [ln for ln in captured.err.splitlines() if ln.startswith("dlm-adapt")]
            assert code != 0 and len(err) == 1 and "some_other_cache" in err[0] and "dlm-adapt upgrade" in err[0], err


def test_drafter_alpha_and_targets_shape_the_adapter_and_decoding_stays_the_parents(drafters, tmp_path, capsys):
    """`--drafter-alpha` and `--drafter-targets`: config.drafter records them, the adapter holds LoRA pairs on those
    projections alone, and a nonzero adapter of that shape still decodes the parent's greedy text; a projection the
    model lacks is one line naming those it has, with no output written."""
    root, source, _, _ = drafters("llama")
    out = adapt.convert(root, tmp_path / "few", block_size=4, drafter=True, drafter_rank=2, drafter_alpha=3.0,
                        drafter_targets="q_proj, down_proj")
    spec = json.loads((out / "config.json").read_text())["drafter"]
    assert spec["alpha"] == 3.0 and spec["targets"] == ["down_proj", "q_proj"]
    model, _ = adapt.load(out)
    assert {key.rsplit("__", 1)[-1] for key in model.drafter.lora} == {"down_proj", "q_proj"}
    assert model.drafter.scale == 1.5
    with torch.no_grad():
        for p in model.drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    prompt = torch.tensor([[5, 6, 7, 8]])
    want = source.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=10,
                           pad_token_id=3)[0, 4:].tolist()
    got = model.eval().diffusion_generate(prompt, max_new_tokens=10, speculative=True)[0, 4:].tolist()
    eos = source.generation_config.eos_token_id
    cut = lambda t: t[: t.index(eos) + 1] if eos in t else t  # noqa: E731
    assert cut(got) == cut(want)
    capsys.readouterr()
    assert main(["convert", str(root), str(tmp_path / "bad"), "--block-size", "4", "--drafter",
                 "--drafter-targets", "q_proj,nope"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dlm-adapt")]
    assert len(err) == 1 and "drafter targets nope: this model has no such projection; choose among" in err[0]
    assert not (tmp_path / "bad").exists()
