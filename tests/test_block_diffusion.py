"""Block-diffusion checkpoints and the 2L training layout's forward: block-causal attention in
every architecture and layer type, B = 1 is the causal source, padding, eager = sdpa, transformers alone."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import adapt
from adapt import AdaptError
from adapt.config import load_config
from adapt.model import MaskedDiffusionConfig, MaskedDiffusionLM
from adapt.model.block_masked_diffusion import two_l_logits
from tiny_models import ARCHS, layer_type_variants, save_tiny_source, tiny_config

B, SEQ, MASK = 4, 12, 5


def _sdpa(arch):
    return bool(MODEL_FOR_CAUSAL_LM_MAPPING[type(tiny_config(arch))]._supports_sdpa)


def _impls(arch):
    return ["eager", "sdpa"] if _sdpa(arch) else ["eager"]


def _model(config, impl="eager", block_size=B):
    torch.manual_seed(0)
    model = MaskedDiffusionLM(MaskedDiffusionConfig(text_config=config.to_dict(), mask_token_id=MASK,
                                                    block_size=block_size))
    model.set_attn_implementation(impl)
    assert model.config.text_config._attn_implementation == impl
    return model.eval()


def _ids(batch=1, length=SEQ, seed=0):
    return torch.randint(6, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def _changed(model, x, positions, **kwargs):
    """Per-position max change of the logits when the token at each of `positions` changes (one row each), in
    one batched forward."""
    rows = [x[0]]
    for at in positions:
        rows.append(x[0].clone())
        rows[-1][at] = 6 if x[0, at] != 6 else 7
    with torch.no_grad():
        logits = model(torch.stack(rows), **kwargs).logits
    return (logits[1:] - logits[:1]).abs().amax(-1)


@pytest.fixture(scope="module")
def block_1(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-b1")
            save_tiny_source(root / "src", arch)
            adapt.convert(root / "src", root / "dlm", block_size=1)
            cache[arch] = root / "src", root / "dlm"
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_block_size_1_with_shift_is_the_causal_source(block_1, arch):
    src, out = block_1(arch)
    causal = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    model, _ = adapt.load(out, attn_implementation="eager")
    assert model.config.block_size == 1 and model.config.shift
    x = _ids(batch=2)
    for impl in _impls(arch):
        causal.set_attn_implementation(impl)
        model.set_attn_implementation(impl)
        assert model.config.text_config._attn_implementation == impl
        with torch.no_grad():
            ref = causal(x).logits
            got = model(x, attention_mask=torch.ones_like(x)).logits
        torch.testing.assert_close(got[..., : ref.shape[-1]], ref, atol=1e-5, rtol=0)
        with torch.no_grad():  # the 2L training layout too: every logit is the clean stream's, the parent's on x_0
            two_l = two_l_logits(model, torch.full_like(x, model.config.mask_token_id), x)
        torch.testing.assert_close(two_l[..., : ref.shape[-1]], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_causal_between_and_bidirectional_inside_in_every_layer_type(arch):
    for layer_type, config in layer_type_variants(tiny_config(arch, 100)).items():
        for impl in _impls(arch):
            model, x = _model(config, impl), _ids()
            blocks = (1, 2)
            changed = _changed(model, x, [k * B + 1 for k in blocks])  # a token of block k, not its first
            for k, row in zip(blocks, changed):
                where = f"{arch}/{layer_type}/{impl} block {k}"
                assert row[: k * B].max() < 1e-6, f"{where}: an earlier block sees a later one"
                assert row[k * B] > 1e-4, f"{where}: the block's first position does not see its second"
            causal = _changed(model, x, [B + 1], is_causal=True)[0]
            assert causal[B] < 1e-6, f"{arch}/{layer_type}/{impl}: is_causal=True must give the causal model"


@pytest.mark.parametrize("arch", ARCHS)
def test_one_block_over_the_whole_canvas_is_full_sequence_diffusion(arch):
    config = tiny_config(arch, 100)  # sliding windows (8) cut this canvas (12): the windows must agree too
    x = torch.cat([_ids(), _ids(seed=1)])
    pad = torch.ones_like(x)
    pad[1, :3] = 0
    with torch.no_grad():
        block = _model(config, block_size=SEQ + 4)(x, attention_mask=pad).logits
        full = _model(config, block_size=None)(x, attention_mask=pad).logits
    torch.testing.assert_close(block[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(block[1, 3:], full[1, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_changes_no_real_position(arch):
    """Blocks count from each row's first real token, so a left-padded row is the same row alone."""
    model = _model(tiny_config(arch, 100), _impls(arch)[-1])
    x, other = _ids(length=10), _ids(length=13, seed=1)
    batch = torch.cat([torch.cat([torch.full((1, 3), 3), x], 1), other])
    pad = torch.ones_like(batch)
    pad[0, :3] = 0
    with torch.no_grad():
        alone = model(x).logits
        padded = model(batch, attention_mask=pad).logits
        other_alone = model(other).logits
    torch.testing.assert_close(padded[0, 3:], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[1], other_alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", [a for a in ARCHS if _sdpa(a)])
def test_eager_and_sdpa_agree(arch):
    config = tiny_config(arch, 100)
    x = torch.cat([_ids(), _ids(seed=1)])
    pad = torch.ones_like(x)
    pad[1, :5] = 0
    with torch.no_grad():
        eager = _model(config, "eager")(x, attention_mask=pad).logits
        sdpa = _model(config, "sdpa")(x, attention_mask=pad).logits
    torch.testing.assert_close(sdpa[0], eager[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa[1, 5:], eager[1, 5:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3"])
def test_implementations_without_the_mask_are_refused(impl):
    model = _model(tiny_config("llama", 100))
    model.config.text_config._attn_implementation = impl  # set directly: these may not be installed here
    with pytest.raises(ValueError, match=f"'{impl}' cannot take the block-diffusion mask"):
        model(_ids())


@pytest.mark.parametrize("arch,shift", [(arch, True) for arch in ARCHS] + [("llama", False)])
def test_2l_layout_logits_are_the_inference_view(arch, shift):
    """The logits that predict block b's tokens (with shift: positions bB-1 .. bB+B-2) equal those of a canvas
    forward of clean blocks < b followed by noised blocks >= b, the view the denoiser has at inference."""
    model = _model(tiny_config(arch, 100), "eager")
    model.config.shift = shift
    clean = _ids(batch=2)
    noisy = torch.where(torch.rand(clean.shape, generator=torch.Generator().manual_seed(2)) < 0.5, MASK, clean)
    pad = torch.ones_like(clean)
    pad[1, :2] = 0  # row 1 left-padded: its blocks count from its first real token
    with torch.no_grad():
        two_l = two_l_logits(model, noisy, clean, attention_mask=pad)
        assert two_l.shape[:2] == clean.shape
        for row, start in ((0, 0), (1, 2)):
            for b in range((SEQ - start + B - 1) // B):
                lo = start + b * B
                view = torch.cat([clean[row:row + 1, :lo], noisy[row:row + 1, lo:]], 1)
                canvas = model(view, attention_mask=pad[row:row + 1]).logits[0]
                span = slice(max(start, lo - shift), min(SEQ, lo + B) - shift)
                torch.testing.assert_close(two_l[row, span], canvas[span], atol=1e-5, rtol=0)
        # the noised half must not leak into the clean stream: changing noised block 1 moves only its own logits
        other = noisy.clone()
        other[:, B + 1] = MASK if noisy[0, B + 1] != MASK else 6
        moved = (two_l_logits(model, other, clean, attention_mask=pad) - two_l)[0].abs().amax(-1)
    own = torch.zeros(SEQ, dtype=torch.bool)
    own[B:2 * B - shift] = True  # with shift, the block's last logit is the clean stream's
    assert moved[~own].max() < 1e-6 and moved[own].min() > 1e-4


def test_2l_layout_needs_a_block_checkpoint():
    model = _model(tiny_config("llama", 100), block_size=None)
    with pytest.raises(ValueError, match="block_size is None"):
        two_l_logits(model, _ids(), _ids())


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "4"])
def test_convert_refuses_a_bad_block_size(tmp_path, bad):
    with pytest.raises(AdaptError, match="block size must be a positive integer"):
        adapt.convert(tmp_path / "src", tmp_path / "dlm", block_size=bad)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        MaskedDiffusionConfig(text_config=tiny_config("llama").to_dict(), mask_token_id=MASK, block_size=bad)


# A process in which `import adapt` fails: only transformers' remote-code path can load the checkpoint.
_REMOTE = textwrap.dedent("""
    import json, sys, torch
    sys.modules["adapt"] = None
    from transformers import AutoModel
    results = {}
    for path in sys.argv[2:]:
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.arange(6, 18).unsqueeze(0)
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.diffusion_generate(ids[:, :5], max_new_tokens=6, steps=6)  # block decoding, exact cache
        results[path] = {"block_size": model.config.block_size, "logits": logits.tolist(),
                         "generated": generated.tolist(), "block_length": model.generation_config.block_length}
    json.dump(results, open(sys.argv[1], "w"))
""")


def test_block_checkpoint_loads_with_transformers_alone(tmp_path):
    paths = []
    for arch in ("llama", "gemma3_text"):  # one plain, one with sliding and full layer types
        save_tiny_source(tmp_path / arch, arch)
        paths.append(adapt.convert(tmp_path / arch, tmp_path / f"{arch}-dlm", block_size=B))
    result = tmp_path / "result.json"
    subprocess.run([sys.executable, "-c", _REMOTE, str(result), *map(str, paths)], check=True, timeout=120)
    remote = json.loads(result.read_text())
    for path in paths:
        got = remote[str(path)]
        assert got["block_size"] == B and got["block_length"] == B
        assert json.loads((path / "config.json").read_text())["block_size"] == B
        model, _ = adapt.load(path)
        here = model.diffusion_generate(torch.arange(6, 11).unsqueeze(0), max_new_tokens=6, steps=6)
        assert got["generated"] == here.tolist() and len(here[0]) == 11 and model.config.mask_token_id not in here
        with torch.no_grad():
            here = model(torch.arange(6, 18).unsqueeze(0)).logits
        torch.testing.assert_close(torch.tensor(got["logits"]), here, atol=1e-5, rtol=0)
    # the likelihood is the block-wise bound of the checkpoint's block size; training needs annealing off
    (tmp_path / "train.txt").write_text("\n\n".join(" ".join(f"w{i + j}" for j in range(12)) for i in range(40)))
    elbo = adapt.evaluate(paths[0], str(tmp_path / "train.txt"), seq_length=12, num_sequences=2, mc_samples=2)["elbo"]
    assert elbo["block_size"] == B and "block_size_note" not in elbo
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.path={paths[0]}",
                             f"data.train={tmp_path / 'train.txt'}", "data.seq_length=12", "max_steps=1"])
    with pytest.raises(AdaptError, match="block-diffusion checkpoint .*set anneal.mode=none"):
        adapt.train(cfg)


def test_model_card_says_block_diffusion(tmp_path):
    save_tiny_source(tmp_path / "src", "llama")
    dlm = adapt.convert(tmp_path / "src", tmp_path / "dlm", block_size=2)
    card = adapt.push_to_hub(dlm, "me/block", dry_run=True).card
    assert "| attention | block diffusion, block size 2: bidirectional inside a block, causal between blocks" in card
