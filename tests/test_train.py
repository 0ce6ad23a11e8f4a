"""Training: metrics and final checkpoint, exact resume, crash safety, LoRA/QLoRA, bad inputs."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapt
from adapt import AdaptError
from adapt.training import training_state as checkpointing
from adapt.config import load_config
from adapt.config.recipes import run_config
from tiny_models import write_word_runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory, converted):
    root = tmp_path_factory.mktemp("train")
    source, dlm = converted("llama")  # copies: no test here can change what other modules share
    shutil.copytree(source, root / "causal")
    shutil.copytree(dlm, root / "dlm")
    write_word_runs(root / "train.txt", 300)
    return root


def _cfg(setup, out, *overrides, model="dlm"):
    base = [f"output_dir={out}", f"model.path={setup / model}", f"data.train={setup / 'train.txt'}",
            "data.seq_length=16", "data.max_eval_sequences=8", "train.batch_size=4", "train.lr=3e-3",
            "max_steps=6", "eval_steps=3", "save_steps=0", "anneal.anneal_steps=4", "model.attn_implementation=eager"]
    return load_config(None, base + list(overrides))


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_full_run_logs_metrics_and_writes_a_loadable_final(setup, tmp_path):
    out = tmp_path / "run"
    final = adapt.train(_cfg(setup, out, "sample_steps=3", model="causal"))  # causal source: converted on the fly
    assert (out / "converted" / "config.json").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "mask_ratio", "tokens_per_s"} <= r.keys() for r in records)
    assert [r["mask_ratio"] for r in records] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert "val_elbo" in records[2] and "val_elbo" in records[5] and "val_elbo" not in records[0]
    assert (out / "samples.log").read_text().count("--- step") == 2
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] and (final / "modeling_masked_diffusion.py").exists()
    model, _ = adapt.load(final)
    assert model.config.mask_token_id == 100
    assert not adapt.upgrade(final, check=True).needed  # a final is written in the current format
    (final / "transformers_compat.py").unlink()  # ... and `upgrade` takes one as it takes a convert output
    assert adapt.upgrade(final).written and not adapt.upgrade(final, check=True).needed


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_reproduces_the_uninterrupted_losses(setup, tmp_path, method):
    extra = [f"train.method={method}", "max_steps=8", "train.gradient_accumulation_steps=2", "eval_steps=0",
             "objective.t_sampling=antithetic"]
    adapt.train(_cfg(setup, tmp_path / "straight", *extra))
    assert adapt.train(_cfg(setup, tmp_path / "split", *extra, "stop_after=4")) is None
    adapt.train(_cfg(setup, tmp_path / "split", *extra, "resume=true"))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(straight) == 8 and split == straight  # bit-identical, step by step


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_trainable_parameter_changes(setup, tmp_path, method):
    out = tmp_path / "run"
    cfg = _cfg(setup, out, f"train.method={method}", "max_steps=6", "stop_after=3", "eval_steps=0")
    torch.manual_seed(cfg.train.seed)
    from adapt.training.recipe import load_for_training

    initial = load_for_training(cfg, str(setup / "dlm"))
    before = {n: p.detach().clone() for n, p in initial.named_parameters() if p.requires_grad}
    adapt.train(cfg)
    after = load_file(out / "checkpoints" / "step-00000003" / "trainable.safetensors")
    aliases = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())["aliases"]
    assert set(after) | set(aliases) == set(before)
    unchanged = [n for n in after if torch.equal(after[n], before[n])]
    assert unchanged == []
    if method == "lora":
        delta = [n for n in after if "trainable_tokens_delta" in n]
        assert delta and after[delta[0]].abs().sum() > 0  # the [MASK] row is being learned


def test_qlora_step_runs_on_cpu_and_merges(setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    final = adapt.train(_cfg(setup, tmp_path / "q", "train.method=qlora", "max_steps=2", "eval_steps=0"))
    model, _ = adapt.load(final)
    converted, _ = adapt.load(setup / "dlm")
    mask_id = model.config.mask_token_id
    emb, before = model.get_input_embeddings().weight, converted.get_input_embeddings().weight
    assert not torch.equal(emb[mask_id], before[mask_id])  # merged trainable [MASK] row
    assert _losses(tmp_path / "q")[0] > 0


def test_partial_checkpoint_write_is_ignored_on_resume(setup, tmp_path):
    out = tmp_path / "run"
    adapt.train(_cfg(setup, out, "max_steps=6", "stop_after=2", "eval_steps=0"))
    # what a kill -9 in the middle of the next save leaves behind
    partial = out / "checkpoints" / ".tmp-step-00000004"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\x00" * 10)
    adapt.train(_cfg(setup, out, "max_steps=6", "resume=true", "eval_steps=0"))
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_resume_falls_back_past_a_corrupt_checkpoint_and_a_torn_metrics_line(setup, tmp_path, capsys):
    extra = ["max_steps=8", "eval_steps=0", "save_steps=2", "save_total_limit=3"]
    adapt.train(_cfg(setup, tmp_path / "straight", *extra))
    out = tmp_path / "split"
    assert adapt.train(_cfg(setup, out, *extra, "stop_after=6")) is None
    ckpts = out / "checkpoints"
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step-00000002", "step-00000004", "step-00000006"]
    optimizer = ckpts / "step-00000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # e.g. a disk that filled up
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # a kill in the middle of a write
    capsys.readouterr()
    adapt.train(_cfg(setup, out, *extra, "resume=true"))
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("dlm-adapt:")]
    assert len(notes) == 1 and "resuming from step-00000004" in notes[0], notes
    assert "step-00000006, which is incomplete (optimizer.pt has" in notes[0]
    assert _losses(out) == _losses(tmp_path / "straight")  # steps 5-8 rerun exactly; the torn line is gone
    assert checkpointing.verify(ckpts / "step-00000006") is None  # rewritten whole by the resumed run


def test_manifest_catches_missing_truncated_and_damaged_files(tmp_path):
    step = tmp_path / "step-00000001"
    step.mkdir()
    for name in ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng-0.pt"):
        (step / name).write_bytes(name.encode() * 50)
    # without a manifest (dlm-adapt 0.1.0 wrote none) only the required files can be checked
    assert checkpointing.verify(step) is None and checkpointing.is_unverified(step)
    (step / "scheduler.pt").rename(step / "scheduler.bak")
    assert checkpointing.verify(step) == "no manifest.json, and scheduler.pt is missing"
    (step / "scheduler.bak").rename(step / "scheduler.pt")
    checkpointing.write_manifest(step)
    assert not checkpointing.is_unverified(step)
    assert checkpointing.verify(step) is None
    (step / "optimizer.pt").write_bytes(b"x" * 100)  # same file, other size
    assert "optimizer.pt has 100 bytes" in checkpointing.verify(step)
    (step / "optimizer.pt").write_bytes(b"optimizer.pt" * 50)
    data = bytearray((step / "trainable.safetensors").read_bytes())
    data[7] ^= 1  # same size, one bit flipped
    (step / "trainable.safetensors").write_bytes(bytes(data))
    assert "trainable.safetensors does not match its sha256" in checkpointing.verify(step)
    (step / "trainable.safetensors").write_bytes(b"trainable.safetensors" * 50)
    (step / "rng-0.pt").unlink()
    assert checkpointing.verify(step) == "rng-0.pt missing"
    (step / "manifest.json").write_text("{")
    assert checkpointing.verify(step).startswith("unreadable manifest.json")
    # the newest whole checkpoint wins; newer broken ones are reported
    good = tmp_path / "step-00000000"
    good.mkdir()
    for name in ("state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt"):
        (good / name).write_text("{}")
    checkpointing.write_manifest(good)
    found, skipped = checkpointing.newest_complete(tmp_path)
    assert found == good and [p.name for p, _ in skipped] == ["step-00000001"]


@pytest.mark.slow
def test_kill_9_during_checkpointing_then_resume(setup, tmp_path):
    out = tmp_path / "run"
    # every step saves, so the resumed run's steps cost a save each: 80 steps (~15 ms each here, more on a busy
    # machine) leave the run alive well past the kill's 0.3 s of jitter after the second checkpoint
    steps = 80
    overrides = [f"output_dir={out}", f"model.path={setup / 'dlm'}", f"data.train={setup / 'train.txt'}",
                 "data.seq_length=16", "train.batch_size=4", f"max_steps={steps}", "save_steps=1",
                 "eval_steps=0", "save_total_limit=3"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "adapt", "train", str(recipe), *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.05)
    time.sleep(random.Random(1).uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run([sys.executable, "-m", "adapt", "train", str(recipe), *overrides, "resume=true"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    logged = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    assert (out / "final" / "config.json").exists()


def test_every_shipped_recipe_validates():
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted((root / "adaptation").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        cfg = load_config(path)
        assert cfg.model.path and cfg.data.train and cfg.output_dir, path
    from accelerate.commands.config.config_args import ClusterConfig

    accel = sorted((root / "accelerate").glob("*.yaml"))
    assert {p.stem for p in accel} >= {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"}
    kinds = {"ddp": ("MULTI_GPU", None), "fsdp": ("FSDP", None), "deepspeed-zero2": ("DEEPSPEED", 2),
             "deepspeed-zero3": ("DEEPSPEED", 3)}
    for path in accel:
        config = ClusterConfig.from_yaml_file(str(path))  # Accelerate's own reader accepts it
        kind, stage = kinds[path.stem]
        assert str(config.distributed_type).rpartition(".")[2] == kind, path  # the file does what its name says
        if stage is not None:
            assert config.deepspeed_config["zero_stage"] == stage, path


BAD = {
    "missing data file": (["data.train=/nonexistent/train.txt"], "data file .* not found"),
    "empty dataset": (["data.train={empty}"], "is empty"),
    "sequence length beyond positions": (["data.seq_length=100"], "exceeds the model's 64 positions"),
    "lora targets match nothing": (["train.method=lora", "lora.target_modules=[nope]"], "LoRA target modules"),
    "unknown key": (["train.lrr=1"], "unknown config key 'train.lrr'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_training_input_is_one_clear_error(setup, tmp_path, case):
    overrides, message = BAD[case]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    overrides = [o.format(empty=empty) for o in overrides]
    out = tmp_path / "run"
    with pytest.raises(AdaptError, match=message):
        adapt.train(_cfg(setup, out, *overrides))
    assert not (out / "final").exists() and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("mode", ["full-sequence", "block"])
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(setup, tmp_path, mode):
    # `accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up; torchrun gives
    # real multi-CPU data parallelism (gloo), which Accelerate detects from the environment.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    common = [f"model.path={setup / 'dlm'}", f"data.train={setup / 'train.txt'}", "data.seq_length=16",
              "max_steps=4", "eval_steps=0", "anneal.anneal_steps=3", "objective.normalization=all"]
    if mode == "block":  # the 2L forward goes through DDP's wrapper; per-block t is drawn for the global batch
        common += ["anneal.mode=none", "block.size=4", "block.schedule=[2,4]", "block.stage_steps=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "adapt",
                          "train", str(recipe), f"output_dir={tmp_path / 'two'}", "train.batch_size=2", *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    adapt.train(load_config(recipe, [f"output_dir={tmp_path / 'one'}", "train.batch_size=4", *common]))
    # normalisation by all tokens makes the mean of per-process losses equal the global loss; the noise is
    # drawn for the global batch, so only float reduction order differs
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")),
                               rtol=1e-5, atol=0)


def test_attention_and_mlp_learning_rates_are_separate(setup):
    from adapt.config import TrainOptions
    from adapt.training.recipe import param_groups

    model, _ = adapt.load(setup / "dlm")
    groups = {g["name"]: g for g in param_groups(model, TrainOptions(lr=1e-4, attention_lr=3e-4, mlp_lr=5e-5))}
    assert groups["attention"]["lr"] == 3e-4 and groups["mlp"]["lr"] == 5e-5 and groups["other"]["lr"] == 1e-4
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("self_attn" in names[id(p)] for p in groups["attention"]["params"])
    assert all(".mlp." in names[id(p)] for p in groups["mlp"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_gradient_checkpointing_and_adapter_only_final(setup, tmp_path):
    final = adapt.train(_cfg(setup, tmp_path / "run", "train.method=lora", "model.gradient_checkpointing=true",
                             "lora.save_adapter_only=true", "max_steps=2", "eval_steps=0"))
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    from peft import PeftModel

    base, _ = adapt.load(setup / "dlm")
    model = PeftModel.from_pretrained(base, final)
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, 101)


def test_hub_dataset_name_goes_through_datasets(setup, tmp_path, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset

    def fake(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return real("text", data_files=[str(setup / "train.txt")], split="train", sample_by="paragraph")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    adapt.train(_cfg(setup, tmp_path / "run", "data.train=someorg/stories", "data.hub_config=small",
                     "max_steps=1", "eval_steps=0"))
    assert ("someorg/stories", "small", "train") in calls


@pytest.mark.parametrize("old, new, value", [("data.block_length", "data.seq_length", 32),  # gone in 0.6.0
                                             ("data.max_eval_blocks", "data.max_eval_sequences", 4)])  # in 0.7.0
def test_renamed_recipe_keys_are_unknown_keys_after_their_release(tmp_path, capsys, old, new, value):
    """A renamed key past its release is an unknown key, in a file, an override or a run's recorded config: one
    error that names it and lists the known keys of its section, the new name among them."""
    section, leaf = old.split(".")
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"{section}:\n  {leaf}: {value}\n")
    for load in (lambda: load_config(recipe), lambda: load_config(None, [f"{old}={value}"]),
                 lambda: run_config({section: {leaf: value}})):
        with pytest.raises(AdaptError, match=f"unknown config key '{old}'") as e:
            load()
        assert new.split(".")[1] in str(e.value) and "\n" not in str(e.value)
    assert capsys.readouterr().err == ""  # no warning any more
    assert getattr(load_config(None, [f"{new}={value}"]).data, new.split(".")[1]) == value


def test_block_diffusion_run_follows_its_schedule_and_resumes_bit_exactly(setup, tmp_path):
    extra = ["anneal.mode=none", "block.size=4", "block.schedule=[1,2,4]", "block.stage_steps=2", "max_steps=8",
             "eval_steps=4", "objective.complementary=true", "sample_steps=4"]
    final = adapt.train(_cfg(setup, tmp_path / "straight", *extra))
    assert (tmp_path / "straight" / "samples.log").read_text().count("--- step") == 2  # block decoding
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["block_size"] for r in steps] == [1, 1, 2, 2, 4, 4, 4, 4]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert [math.isfinite(r["val_elbo"]) for r in records if "val_elbo" in r] == [True, True]
    assert json.loads((final / "config.json").read_text())["block_size"] == 4
    assert adapt.train(_cfg(setup, tmp_path / "split", *extra, "stop_after=3")) is None
    adapt.train(_cfg(setup, tmp_path / "split", *extra, "resume=true"))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")  # bit-identical across the stage change


def test_a_separator_is_recorded_and_eval_packs_with_it(setup, tmp_path):
    """data.separator goes into OUTPUT/final/config.json, so `dlm-adapt eval` scores text packed as training packed
    it; a later run without one drops the record."""
    final = adapt.train(_cfg(setup, tmp_path / "sep", "data.separator=<pad>", "max_steps=2", "eval_steps=0"))
    assert json.loads((final / "config.json").read_text())["document_separator"] == "<pad>"
    kw = dict(seq_length=16, num_sequences=4, mc_samples=2)
    recorded = adapt.evaluate(str(final), str(setup / "train.txt"), **kw)
    assert recorded["separator"] == "<pad>"
    assert recorded["elbo"] == adapt.evaluate(str(final), str(setup / "train.txt"), separator="<pad>", **kw)["elbo"]
    assert recorded["elbo"] != adapt.evaluate(str(final), str(setup / "train.txt"), separator="</s>", **kw)["elbo"]
    again = adapt.train(_cfg(setup, tmp_path / "again", "max_steps=1", "eval_steps=0", model=final))
    assert "document_separator" not in json.loads((again / "config.json").read_text())


def test_block_diffusion_refuses_annealing():
    with pytest.raises(adapt.AdaptError, match="anneal.mode.*must be none with block diffusion"):
        load_config(None, ["block.size=4"])
