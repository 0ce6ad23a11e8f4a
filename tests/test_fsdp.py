"""FSDP2 on CPU (torchrun, gloo): losses, checkpoints, resume and OUTPUT/final equal to one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import adapt
from adapt.training import training_state as checkpointing
from adapt.config import load_config
import test_train
from test_train import _losses

ROOT = Path(__file__).resolve().parents[1]
setup = test_train.setup  # the module-scoped fixture: tiny llama and its training text


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny model's matmuls are too small to share: with 2 threads on 2 busy cores each one waits for the
    # other to be scheduled (a LoRA run here took 10 s instead of 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fsdp_env() -> dict:
    """The environment `accelerate launch --config_file recipes/accelerate/fsdp.yaml` gives each process (its
    fsdp_config keys, upper-cased), so the shipped config is what runs here, on CPU processes."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text())
    env = {key.upper(): str(value).lower() if isinstance(value, bool) else str(value)
           for key, value in config["fsdp_config"].items()}
    return {**os.environ, **env, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def torchrun(tmp_path, runs: list[list[str]]) -> subprocess.Popen:
    spec, pids = tmp_path / "runs.json", tmp_path / "pids"
    spec.write_text(json.dumps(runs))
    pids.mkdir()
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "multi_run.py"), str(spec), str(pids)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=fsdp_env())


def _base(setup, out, *extra):
    return [f"output_dir={out}", f"model.path={setup / 'dlm'}", f"data.train={setup / 'train.txt'}",
            "data.seq_length=16", "data.max_eval_sequences=8", "train.lr=3e-3", "anneal.anneal_steps=3",
            "model.attn_implementation=eager", "objective.normalization=all", *extra]


def _elbos(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_elbo"] for r in records if "val_elbo" in r]


def _logits(final):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(final, trust_remote_code=True).eval()  # transformers alone: the shipped code
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        return model(torch.arange(4, 20).unsqueeze(0)).logits


def assert_full_weights(final):
    """Every tensor in OUTPUT/final has the shape a model built from its config.json has: a rank's shard (half
    the rows of a weight) fails here."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(final, trust_remote_code=True)
    with init_empty_weights():
        reference = AutoModel.from_config(config, trust_remote_code=True)
    want = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    got = {}
    for f in final.glob("*.safetensors"):
        got.update({name: tuple(t.shape) for name, t in load_file(f).items()})
    assert got and {n: want.get(n) for n in got} == got, "OUTPUT/final holds tensors of the wrong shape"


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_resume_bit_exactly_and_survive_kill_9(setup, tmp_path):
    """One launch (each costs ~10 s here): full 8 steps with gradient accumulation; 4 + 4 resumed; LoRA with
    gradient checkpointing, 4 steps and 2 + 2 resumed; then a run whose rank 1 is killed mid-save. Then one
    process reruns full and LoRA, and resumes the killed run."""
    full = ["max_steps=8", "eval_steps=4", "save_steps=4", "train.gradient_accumulation_steps=2"]
    lora = ["train.method=lora", "max_steps=4", "eval_steps=2", "save_steps=2", "sample_steps=4",
            "model.gradient_checkpointing=true"]
    killed = tmp_path / "killed"
    # every step saves: each is a chance to catch rank 1 mid-save, and each costs the one-process resume a save
    doomed = ["max_steps=24", "eval_steps=0", "save_steps=1", "save_total_limit=2"]
    launch = torchrun(tmp_path, [
        _base(setup, tmp_path / "two", "train.batch_size=2", *full),
        _base(setup, tmp_path / "split", "train.batch_size=2", *full, "stop_after=4"),
        _base(setup, tmp_path / "split", "train.batch_size=2", *full, "resume=true"),
        _base(setup, tmp_path / "two-lora", "train.batch_size=2", *lora),
        _base(setup, tmp_path / "split-lora", "train.batch_size=2", *lora, "stop_after=2"),
        _base(setup, tmp_path / "split-lora", "train.batch_size=2", *lora, "resume=true"),
        _base(setup, killed, "train.batch_size=2", *doomed),
    ])
    ckpts = killed / "checkpoints"
    deadline = time.time() + 240
    # rank 1 dies while a checkpoint is being written, after two whole ones
    while time.time() < deadline and launch.poll() is None and not (
            len(list(ckpts.glob("step-*"))) >= 2 and list(ckpts.glob(".tmp-step-*"))):
        time.sleep(0.005)
    assert launch.poll() is None, launch.stderr.read()[-4000:]
    os.kill(int((tmp_path / "pids" / "1").read_text()), signal.SIGKILL)
    assert launch.wait(timeout=120) != 0
    assert not (killed / "final").exists()
    adapt.train(load_config(None, _base(setup, tmp_path / "one", "train.batch_size=4", *full)))
    adapt.train(load_config(None, _base(setup, tmp_path / "one-lora", "train.batch_size=4", *lora)))
    for a, b in [("two", "one"), ("two-lora", "one-lora")]:
        # the noise is drawn for the global batch and losses are normalised by all tokens: only the float
        # reduction order differs
        torch.testing.assert_close(torch.tensor(_losses(tmp_path / a)), torch.tensor(_losses(tmp_path / b)),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(_elbos(tmp_path / a)), torch.tensor(_elbos(tmp_path / b)),
                                   rtol=1e-5, atol=0)  # evaluation runs on every rank through the sharded model
        assert_full_weights(tmp_path / a / "final")
        logits, expected = _logits(tmp_path / a / "final"), _logits(tmp_path / b / "final")
        # every column but [MASK] (id 100), which sampling sets to -inf: its output row is never a target, so its
        # gradient is ~0 and Adam's normalisation turns reduction-order noise into lr-sized steps (1.7e-4 apart
        # after 8 steps; 2-process DDP lands 1.5e-4 from 1 process too)
        torch.testing.assert_close(logits[..., :100], expected[..., :100], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[..., 100], expected[..., 100], rtol=0, atol=1e-2)
    assert len(_losses(tmp_path / "two")) == 8 and _losses(tmp_path / "split") == _losses(tmp_path / "two")
    assert len(_losses(tmp_path / "two-lora")) == 4
    assert _losses(tmp_path / "split-lora") == _losses(tmp_path / "two-lora")
    assert (tmp_path / "two-lora" / "samples.log").read_text().count("--- step") == 1  # decoded by both ranks
    ckpt = load_file(tmp_path / "two" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    one = load_file(tmp_path / "one" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert {n: t.shape for n, t in ckpt.items()} == {n: t.shape for n, t in one.items()}  # full, not shards

    # the killed run: its newest renamed checkpoint is whole, and one process resumes it (the checkpoint holds
    # full tensors, so the number of processes may change with the same global batch)
    newest, skipped = checkpointing.newest_complete(ckpts)
    assert newest is not None and skipped == []
    last = int(newest.name.split("-")[1])
    final = adapt.train(load_config(None, _base(setup, killed, "train.batch_size=4", *doomed, "resume=true")))
    assert [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(1, 25))
    assert last >= 2 and not list(ckpts.glob(".tmp-*"))
    assert_full_weights(final)


def test_deepspeed_final_goes_through_accelerates_gathering_and_a_shard_is_never_published(setup, tmp_path,
                                                                                          monkeypatch):
    """DeepSpeed cannot run here (no CUDA): the run is told it is sharded by ZeRO, and Accelerate's
    `get_state_dict`, which consolidates ZeRO-3 parameters on rank 0, returns what it would there."""
    from accelerate import Accelerator

    from adapt import AdaptError
    from adapt.training import distributed

    args = ["train.batch_size=4", "max_steps=2", "eval_steps=0"]
    plain = adapt.train(load_config(None, _base(setup, tmp_path / "plain", *args)))
    real, calls = Accelerator.get_state_dict, []

    def gathered(self, model, unwrap=True):
        calls.append(1)
        return real(self, model, unwrap)

    monkeypatch.setattr(distributed, "kind", lambda accelerator: "deepspeed")
    monkeypatch.setattr(Accelerator, "get_state_dict", gathered)
    final = adapt.train(load_config(None, _base(setup, tmp_path / "zero", *args)))
    assert calls == [1]  # the final came from the gathered state, once
    want, got = load_file(plain / "model.safetensors"), load_file(final / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    def one_shard(self, model, unwrap=True):  # what rank 0 holds of a ZeRO-3 model without consolidation
        return {k: v[: max(1, v.shape[0] // 2)] if v.dim() else v for k, v in real(self, model, unwrap).items()}

    monkeypatch.setattr(Accelerator, "get_state_dict", one_shard)
    with pytest.raises(AdaptError, match="a shard, not the full model; no final model was written"):
        adapt.train(load_config(None, _base(setup, tmp_path / "shard", *args)))
    assert not (tmp_path / "shard" / "final").exists() and not list((tmp_path / "shard").glob(".final-tmp"))

    for extra, message in [(["save_steps=1"], "checkpoints .* are not supported under DeepSpeed"),
                           (["train.method=qlora"], "qlora does not run under deepspeed")]:
        with pytest.raises(AdaptError, match=message):
            adapt.train(load_config(None, _base(setup, tmp_path / "refused", *args, *extra)))
        assert not (tmp_path / "refused" / "checkpoints").exists()


def test_unsupported_sharding_is_one_clear_error(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from adapt import AdaptError
    from adapt.training import distributed

    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=False)
    with pytest.raises(AdaptError, match="FSDP2 only: set fsdp_version: 2"):
        distributed.kind(fsdp1)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cpu = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU,
                                                fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(AdaptError, match="FSDP on CPU needs FSDP2"):
        distributed.enable_cpu_fsdp(cpu)
    assert cpu.state.distributed_type == DistributedType.MULTI_CPU
    # a checkpoint of an unsharded run keys its optimizer state by position, which FSDP cannot place
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    by_position = optimizer.state_dict()
    with pytest.raises(AdaptError, match="written by a run without FSDP"):
        distributed.load_optimizer_state(model, optimizer, by_position, sharded=True)
    distributed.load_optimizer_state(model, optimizer, by_position, sharded=False)
