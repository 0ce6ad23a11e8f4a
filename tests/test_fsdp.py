"""FSDP2 on CPU (torchrun, gloo): losses, checkpoints, resume and OUTPUT/final equal to one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import adapt
from adapt.config import load_config
from test_train import _losses, setup  # noqa: F401  (the module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1]


def fsdp_env() -> dict:
    """The environment `accelerate launch --config_file recipes/accelerate/fsdp.yaml` gives each process (its
    fsdp_config keys, upper-cased), so the shipped config is what runs here, on CPU processes."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp.yaml").read_text())
    env = {key.upper(): str(value).lower() if isinstance(value, bool) else str(value)
           for key, value in config["fsdp_config"].items()}
    return {**os.environ, **env, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def torchrun(tmp_path, runs: list[list[str]], timeout=300):
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "multi_run.py"), str(spec)],
                          capture_output=True, text=True, env=fsdp_env(), timeout=timeout)


def _base(setup, out, *extra):  # noqa: F811
    return [f"output_dir={out}", f"model.path={setup / 'dlm'}", f"data.train={setup / 'train.txt'}",
            "data.seq_length=16", "data.max_eval_blocks=8", "train.lr=3e-3", "anneal.anneal_steps=3",
            "model.attn_implementation=eager", "objective.normalization=all", *extra]


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


def test_fsdp_two_processes_match_one_process_resume_bit_exactly_and_write_one_full_final(setup, tmp_path):  # noqa: F811
    full = ["max_steps=8", "eval_steps=4", "save_steps=4"]
    lora = ["train.method=lora", "max_steps=4", "eval_steps=4", "model.gradient_checkpointing=true"]
    two = torchrun(tmp_path, [
        _base(setup, tmp_path / "two", "train.batch_size=2", *full),
        _base(setup, tmp_path / "split", "train.batch_size=2", *full, "stop_after=4"),
        _base(setup, tmp_path / "split", "train.batch_size=2", *full, "resume=true"),
        _base(setup, tmp_path / "two-lora", "train.batch_size=2", *lora),
    ])
    assert two.returncode == 0, two.stderr[-4000:]
    adapt.train(load_config(None, _base(setup, tmp_path / "one", "train.batch_size=4", *full)))
    adapt.train(load_config(None, _base(setup, tmp_path / "one-lora", "train.batch_size=4", *lora)))
    for a, b in [("two", "one"), ("two-lora", "one-lora")]:
        # the noise is drawn for the global batch and losses are normalised by all tokens: only the float
        # reduction order differs
        torch.testing.assert_close(torch.tensor(_losses(tmp_path / a)), torch.tensor(_losses(tmp_path / b)),
                                   rtol=1e-5, atol=0)
        assert_full_weights(tmp_path / a / "final")
        logits, expected = _logits(tmp_path / a / "final"), _logits(tmp_path / b / "final")
        # every column but [MASK] (id 100), which sampling sets to -inf: its output row is never a target, so its
        # gradient is ~0 and Adam's normalisation turns reduction-order noise into lr-sized steps (1.7e-4 apart
        # after 8 steps; 2-process DDP lands 1.5e-4 from 1 process too)
        torch.testing.assert_close(logits[..., :100], expected[..., :100], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[..., 100], expected[..., 100], rtol=0, atol=1e-2)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "two")  # 4 + 4 steps: bit-identical
    assert len(_losses(tmp_path / "two")) == 8
    ckpt = load_file(tmp_path / "two" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    one = load_file(tmp_path / "one" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert {n: t.shape for n, t in ckpt.items()} == {n: t.shape for n, t in one.items()}  # full, not shards
