"""The checkpoint seam (`adapt.checkpoint`): one answer to "what is this path?" for every command, one writer of a
checkpoint's remote code, and a run's recorded config read back as its own dataclass."""

import json
import shutil

import pytest

import adapt
from adapt import AdaptError
from adapt.checkpoint import (ADAPTER, CAUSAL, CODE_FILES, DIFFUSION, NOT_A_MODEL, TRAINING_STATE, detect,
                              remote_code_fields)
from adapt.config import SFTConfig, TrainConfig, load_config, run_config, to_dict
from adapt.model import MODEL_FILES


def _kinds(tmp_path, converted):
    src, dlm = converted("llama")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "state.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    shutil.copytree(dlm, tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    return {
        dlm: DIFFUSION, src: CAUSAL, tmp_path / "model.gguf": CAUSAL, tmp_path / "adapter": ADAPTER,
        tmp_path / "step-00000001": TRAINING_STATE, tmp_path / "empty": NOT_A_MODEL, tmp_path / "broken": NOT_A_MODEL,
        tmp_path / "notes.txt": NOT_A_MODEL, tmp_path / "nowhere": NOT_A_MODEL, "someorg/not-cached": NOT_A_MODEL,
    }


def test_detect_tells_every_kind_from_its_files(converted, tmp_path):
    for path, kind in _kinds(tmp_path, converted).items():
        assert detect(path).kind == kind, path
    assert detect(tmp_path / "model.gguf").gguf_file == "model.gguf"
    assert detect(tmp_path / "model.gguf").path == str(tmp_path)
    assert detect(tmp_path / "broken").error is not None and detect(tmp_path / "broken").has_config
    assert detect("someorg/not-cached").error is not None  # offline, not in the cache: the lookup's own error
    assert detect(converted("llama")[1]).model_type == "masked_diffusion_lm"


def test_convert_and_save_pretrained_write_the_same_remote_code(converted, tmp_path):
    _, dlm = converted("llama")
    model, _ = adapt.load(dlm)
    model.save_pretrained(tmp_path / "resaved")
    for directory in (dlm, tmp_path / "resaved"):
        config = json.loads((directory / "config.json").read_text())
        assert {key: config[key] for key in remote_code_fields()} == remote_code_fields()
        for f in MODEL_FILES:
            assert (directory / f.name).read_bytes() == f.read_bytes()
    assert sorted(f.name for f in MODEL_FILES) == sorted(CODE_FILES)


def test_run_config_records_its_kind_and_reads_back(tmp_path):
    sft = load_config(None, ["data.max_length=64"], cls=SFTConfig)
    for cfg in (load_config(None, ["max_steps=3"]), sft):
        recorded = json.loads(json.dumps(to_dict(cfg), default=str))
        assert recorded["kind"] == type(cfg).__name__
        assert run_config(recorded) == cfg
        del recorded["kind"]  # as runs recorded it before the kind was
        assert type(run_config(recorded)) is type(cfg)
    # a run's config.json is a recipe for the same command, and refused by the other
    (tmp_path / "config.json").write_text(json.dumps(to_dict(sft), default=str))
    assert load_config(tmp_path / "config.json", cls=SFTConfig) == sft
    with pytest.raises(AdaptError, match="records a SFTConfig run, not a TrainConfig one"):
        load_config(tmp_path / "config.json", cls=TrainConfig)
