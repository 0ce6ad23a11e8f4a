"""Bad input through the CLI, one row per case: the exit code, one `dlm-adapt: error:` line on stderr naming
the problem, the files that must stay byte-identical and the paths that must not appear. Rows run in-process
in a fresh workspace (the current directory is WS/work)."""

import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from adapt.cli import main
from adapt.outputs import write_marker
from tiny_models import save_tiny_source


class _Payload:
    def __reduce__(self):
        return os.system, ("touch PWNED",)


@pytest.fixture(scope="module")
def base(tmp_path_factory, converted):
    import adapt

    ws = tmp_path_factory.mktemp("ws")
    converted_block = adapt.convert(converted("llama")[0], tmp_path_factory.mktemp("block") / "dlm", block_size=4)
    save_tiny_source(ws / "models" / "src", "llama")
    (ws / "models" / "sibling").mkdir()
    (ws / "models" / "sibling" / "keep.txt").write_text("a sibling model")
    shutil.copytree(ws / "models" / "src", ws / "models" / "badcfg")
    config = json.loads((ws / "models" / "badcfg" / "config.json").read_text())
    (ws / "models" / "badcfg" / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    (ws / "work").mkdir()
    (ws / "work" / "keep.txt").write_text("the user's working directory")
    (ws / "user").mkdir()
    (ws / "jsondir").mkdir()
    (ws / "user" / "mine.txt").write_text("the user's own folder")
    (ws / "trainrun").mkdir()
    write_marker(ws / "trainrun", "train")
    (ws / "trainrun" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    shutil.copytree(converted("llama")[1], ws / "dlm")
    shutil.copytree(ws / "dlm", ws / "broken")
    (ws / "broken" / "config.json").write_text("{not json")
    shutil.copytree(ws / "dlm", ws / "truncated")
    weights = ws / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(ws / "dlm", ws / "notokenizer")
    for f in (ws / "notokenizer").glob("tokenizer*"):
        f.unlink()
    (ws / "train.txt").write_text("\n\n".join(" ".join(f"w{(i + j) % 90}" for j in range(12)) for i in range(40)))
    (ws / "recipe.yaml").write_text("{}\n")
    (ws / "jinja.yaml").write_text('data:\n  chat_template: "{% for m in messages %}{{ m.content }"\n')
    # a checkpoint renamed into place without a manifest and without scheduler.pt (damaged on disk; a whole one
    # without a manifest is dlm-adapt 0.1.0's and is resumed with a warning)
    step = ws / "trainrun" / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    for name in ("state.json", "trainable.safetensors", "optimizer.pt", "rng-0.pt"):
        (step / name).write_text("{}")
    data = ws / "data"
    data.mkdir()
    for name in ("empty.txt", "empty.jsonl"):
        (data / name).write_bytes(b"")
    (data / "blank.jsonl").write_text("\n  \n\n")
    lines = [json.dumps({"text": f"w{i} w{i + 1} w{i + 2}"}) for i in range(6)]
    (data / "broken.jsonl").write_text("\n".join(lines[:2] + ['{"text": "w3 w4'] + lines[3:]) + "\n")
    (data / "listline.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    (data / "notext.jsonl").write_text("\n".join(json.dumps({"content": f"w{i}"}) for i in range(6)) + "\n")
    (data / "broken.json").write_text('[\n  {"text": "w1"},\n  {"text": "w2",\n]\n')
    (data / "latin1.txt").write_bytes("w1 w2\ncaf\u00e9 w3\n".encode("latin-1"))
    (data / "garbage.parquet").write_bytes(b"not a parquet file at all")
    (data / "binary.txt").write_bytes(b"\x00\x01\xff\xfe w1\n")
    (ws / "dangling").symlink_to(ws / "nowhere")
    (ws / "loop1").symlink_to(ws / "loop2")
    (ws / "loop2").symlink_to(ws / "loop1")
    chat = [json.dumps({"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]})] * 6
    (data / "chat_broken.jsonl").write_text("\n".join(chat[:2] + ['{"messages": [{"role": "user"'] + chat[3:]))
    (data / "chat_nomessages.jsonl").write_text("\n".join(json.dumps({"text": "w1"}) for _ in range(6)) + "\n")
    turn = {"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}
    (data / "chat_int.jsonl").write_text("\n".join(json.dumps({"messages": [turn[0], {**turn[1], "content": 7}]})
                                                   for _ in range(6)) + "\n")
    (data / "chat_null.jsonl").write_text("\n".join(json.dumps({"messages": [
        {**turn[0], "content": None if i == 2 else "w1"}, turn[1]]}) for i in range(6)) + "\n")
    (ws / "badyaml.yaml").write_text("max_steps: 1\ndata:\n  train: [a,\n")
    (ws / "toy_task.yaml").write_text("task: toy\n")
    shutil.copytree(converted_block, ws / "blockdlm")
    shutil.copytree(converted_block, ws / "hugeblock")  # written by an older release that did not check
    config = json.loads((ws / "hugeblock" / "config.json").read_text())
    (ws / "hugeblock" / "config.json").write_text(json.dumps({**config, "block_size": 100000}))
    # pickled weights whose unpickling would run a shell command (touch PWNED, in the working directory)
    for name in ("pickle", "zipped_pickle"):
        shutil.copytree(ws / "models" / "src", ws / "models" / name)
        (ws / "models" / name / "model.safetensors").unlink()
    payload = pickle.dumps({"lm_head.weight": _Payload()}, protocol=2)
    (ws / "models" / "pickle" / "pytorch_model.bin").write_bytes(payload)
    with zipfile.ZipFile(ws / "models" / "zipped_pickle" / "pytorch_model.bin", "w") as z:  # torch.save's layout
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    # checkpoints holding a link to a file outside them (a token, the user's notes)
    for name, link in (("linked", "hf_token"), ("readmelink", "README.md")):
        shutil.copytree(ws / "dlm", ws / name)
        (ws / name / link).symlink_to(Path("..") / "user" / "mine.txt")
    return ws


@pytest.fixture
def ws(base, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    monkeypatch.chdir(ws / "work")
    return ws


SRC_FILES = ["models/src/config.json", "models/src/model.safetensors", "models/sibling/keep.txt"]
WORK = ["work/keep.txt"]
STEP = "trainrun/checkpoints/step-00000002"
SFT = ["sft", "{ws}/recipe.yaml", "model.path={ws}/dlm", "data.chat_template=default", "data.max_length=16",
       "train.batch_size=2", "max_steps=1", "eval_steps=0", "save_steps=0", "output_dir={ws}/run"]
TRAIN = ["train", "{ws}/recipe.yaml", "model.path={ws}/dlm", "data.train={ws}/train.txt", "data.seq_length=8",
         "train.batch_size=2", "max_steps=1", "eval_steps=0", "save_steps=0"]
DRAFTER = [*TRAIN, "model.path={ws}/models/src", "output_dir={ws}/run", "drafter.enabled=true", "anneal.mode=none",
           "block.size=4", "data.generate.prompts=4", "data.generate.prompt_length=4", "data.generate.new_tokens=12"]

# name: (argv, exit code, phrase in the error line, paths kept byte-identical, paths that must not exist)
CASES = {
    # data loss: an output related to an input, the working directory, or a directory dlm-adapt did not write
    "convert into the source's parent": (["convert", "{ws}/models/src", "{ws}/models", "--overwrite"], 2,
                                         "contain one another", SRC_FILES, []),
    "convert into the source itself": (["convert", "{ws}/models/src", "{ws}/models/src", "--overwrite"], 2,
                                       "contain one another", SRC_FILES, []),
    "convert inside the source": (["convert", "{ws}/models/src", "{ws}/models/src/out", "--overwrite"], 2,
                                  "contain one another", SRC_FILES, ["models/src/out"]),
    "convert into an empty path": (["convert", "{ws}/models/src", "", "--overwrite"], 2, "output path is empty",
                                   WORK + SRC_FILES, []),
    "convert into the working directory": (["convert", "{ws}/models/src", ".", "--overwrite"], 2,
                                           "current directory", WORK + SRC_FILES, []),
    "convert into a parent of the working directory": (["convert", "{ws}/models/src", "..", "--overwrite"], 2,
                                                       "current directory", WORK + SRC_FILES, []),
    "convert over a user's folder": (["convert", "{ws}/models/src", "{ws}/user", "--overwrite"], 2,
                                     "was not written by dlm-adapt", ["user/mine.txt"], []),
    "convert over a training run": (["convert", "{ws}/models/src", "{ws}/trainrun", "--overwrite"], 2,
                                    "holds a dlm-adapt train output", ["trainrun/metrics.jsonl"], []),
    "convert over a conversion without --overwrite": (["convert", "{ws}/models/src", "{ws}/dlm"], 2,
                                                      "already exists; pass --overwrite", ["dlm/config.json"], []),
    "train into an empty output_dir": ([*TRAIN, "output_dir=''"], 2, "output_dir is empty", WORK, []),
    "train into the working directory": ([*TRAIN, "output_dir=.", "overwrite=true"], 2, "current directory", WORK,
                                         ["work/final", "work/metrics.jsonl"]),
    "train over a user's folder": ([*TRAIN, "output_dir={ws}/user", "overwrite=true"], 2,
                                   "was not written by dlm-adapt", ["user/mine.txt"], ["user/final"]),
    "train into the model's parent": ([*TRAIN, "model.path={ws}/models/src", "output_dir={ws}/models",
                                       "overwrite=true"], 2, "contain one another", SRC_FILES,
                                      ["models/final", "models/converted"]),
    "train over a run without resume or overwrite": ([*TRAIN, "output_dir={ws}/trainrun"], 2,
                                                     "set resume=true to continue it, overwrite=true",
                                                     ["trainrun/metrics.jsonl"], ["trainrun/final"]),
    "train over a run with resume and overwrite": ([*TRAIN, "output_dir={ws}/trainrun", "resume=true",
                                                    "overwrite=true"], 2, "contradict",
                                                   ["trainrun/metrics.jsonl"], ["trainrun/final"]),
    # finished-looking garbage: an out-of-range setting is refused before anything is written
    "convert with block size 0": (["convert", "{ws}/models/src", "{ws}/blockout", "--block-size", "0"], 2,
                                   "block size must be a positive integer, got 0", [], ["blockout"]),
    "train with a block schedule that misses block.size": ([*TRAIN, "output_dir={ws}/run", "anneal.mode=none",
                                                           "block.size=8", "block.schedule=[1,4]",
                                                           "block.stage_steps=2"], 2,
                                                          "must end at block.size", [], ["run"]),
    "train blocks while annealing": ([*TRAIN, "output_dir={ws}/run", "block.size=4"], 2,
                                     "must be none with block diffusion", [], ["run"]),
    # drafter training (issue 25): each refused before anything is written
    "train a drafter of a diffusion checkpoint without one": ([*DRAFTER, "model.path={ws}/dlm"], 2,
                                                              "without a drafter adapter", [], ["run"]),
    "train a drafter with draft length 0": ([*DRAFTER, "block.size=0"], 2, r"'block.size' must be in \[1, inf\)", [],
                                            ["run"]),
    "train a drafter at temperature 0": ([*DRAFTER, "drafter.temperature=0"], 2,
                                         r"'drafter.temperature' must be in \(0, inf\)", [], ["run"]),
    "train a drafter with LoRA on the parent": ([*DRAFTER, "train.method=lora"], 2,
                                                "must be full in a drafter run", [], ["run"]),
    "generate data without a drafter run": ([*TRAIN, "output_dir={ws}/run", "data.generate.prompts=4"], 2,
                                            "set drafter.enabled=true", [], ["run"]),
    "generate data from text without enough prompts": ([*DRAFTER, "data.generate.prompts=1000"], 2,
                                                       "needs 1000 training prompts of 4 tokens", SRC_FILES, ["run"]),
    "generate data past the model's positions": ([*DRAFTER, "data.generate.new_tokens=100"], 2,
                                                 "exceed the model's 64 positions", [], ["run"]),
    "generate continuations shorter than a draft": ([*DRAFTER, "data.generate.new_tokens=4"], 2,
                                                     r"data.generate.new_tokens \(4\) leaves no room to draft 4",
                                                     [], ["run"]),
    "chat prompts without {text}": ([*DRAFTER, "data.generate.chat_message=Continue the story"], 2,
                                    "'data.generate.chat_message' must contain {text}", [], ["run"]),
    "chat prompts without a chat template": ([*DRAFTER, "data.generate.chat_message=Continue {{text}}"], 2,
                                             "data.generate.chat_message: this tokenizer has no chat template",
                                             [], ["run"]),
    "train a drafter with sft": ([*SFT, "drafter.enabled=true"], 2, "not `dlm-adapt sft`", [], ["run"]),
    "eval with block size 0": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--block-size", "0"], 2,
                               "block_size must be at least 1", [], []),
    "train with max_steps=-5": ([*TRAIN, "output_dir={ws}/run", "max_steps=-5"], 2,
                                r"'max_steps' must be in \[1, inf\), got -5", [], ["run"]),
    "train with max_eval_sequences=0": ([*TRAIN, "output_dir={ws}/run", "data.max_eval_sequences=0"], 2,
                                     "'data.max_eval_sequences' must be in", [], ["run"]),
    "train with objective.eps=2": ([*TRAIN, "output_dir={ws}/run", "objective.eps=2"], 2,
                                   r"'objective.eps' must be in \(0, 1\)", [], ["run"]),
    "train with a beta of 1.5": ([*TRAIN, "output_dir={ws}/run", "train.betas=[0.9, 1.5]"], 2,
                                 "'train.betas' must be in", [], ["run"]),
    "train with flash attention on a machine without it": ([*TRAIN, "output_dir={ws}/run",
                                                            "model.attn_implementation=flash_attention_2"], 2,
                                                           r"^dlm-adapt: error: attn_implementation "
                                                           r"'flash_attention_2' is not available here \(flash-attn is "
                                                           r"not installed\): pip install flash-attn, or use "
                                                           "model.attn_implementation=sdpa$", [], ["run"]),
    "sft with a chat template that is not Jinja": (["sft", "{ws}/jinja.yaml",
                                                    *(a for a in SFT[2:] if "chat_template" not in a),
                                                    "data.train={ws}/data/chat_broken.jsonl"],
                                                   2, r"'data.chat_template' is not a valid Jinja template \(line 1",
                                                   [], ["run"]),
    "train with one beta": ([*TRAIN, "output_dir={ws}/run", "train.betas=[0.9]"], 2,
                            r"'train.betas' must be a list of 2 values, got \[0.9\]", [], ["run"]),
    "sft with a Jinja chat template on the command line": ([*SFT, "data.chat_template={{{{oops}}"], 2,
                                                           "is not valid YAML .*quote a literal string", [], ["run"]),
    "train with an override that is not YAML": ([*TRAIN, "output_dir={ws}/run", "train.lr=[1,"], 2,
                                                "is not valid YAML", [], ["run"]),
    "convert a source whose config disagrees with its weights": (["convert", "{ws}/models/badcfg", "{ws}/out"], 2,
                                                                 "config.json does not match the weights",
                                                                 ["models/badcfg/config.json"], ["out"]),
    "generate at temperature -1": (["generate", "{ws}/dlm", "--prompt", "w1", "--temperature", "-1"], 2,
                                   "temperature must be >= 0", [], []),
    "generate with top-p 5": (["generate", "{ws}/dlm", "--prompt", "w1", "--top-p", "5", "--temperature", "1"], 2,
                              r"top_p must be in \(0, 1\]", [], []),
    "generate with top-k -3": (["generate", "{ws}/dlm", "--prompt", "w1", "--top-k", "-3"], 2,
                               "top_k must be >= 1", [], []),
    "generate -2 new tokens": (["generate", "{ws}/dlm", "--prompt", "w1", "--max-new-tokens", "-2"], 2,
                               "--max-new-tokens must be 0 or more, got -2", [], []),
    "generate 0 new tokens without holes": (["generate", "{ws}/dlm", "--prompt", "w1", "--max-new-tokens", "0"], 2,
                                            "nothing to decode", [], []),
    "generate with 0 steps": (["generate", "{ws}/dlm", "--prompt", "w1", "--steps", "0"], 2,
                              "steps must be at least 1, got 0", [], []),
    "generate with threshold 2": (["generate", "{ws}/dlm", "--prompt", "w1", "--threshold", "2"], 2,
                                  r"threshold must be in \(0, 1\], got 2", [], []),
    "generate 10 new tokens in blocks of 4": (["generate", "{ws}/dlm", "--prompt", "w1", "--max-new-tokens", "10",
                                               "--block-length", "4"], 2,
                                              r"max_new_tokens \(10\) must be a multiple of block_length \(4\)",
                                              [], []),
    "generate from a missing model": (["generate", "{ws}/nowhere", "--prompt", "w1"], 2, "does not exist", [], []),
    "generate from a config.json that is not JSON": (["generate", "{ws}/broken", "--prompt", "w1"], 2,
                                                     "is not a JSON object", [], []),
    "generate from truncated weights": (["generate", "{ws}/truncated", "--prompt", "w1"], 2,
                                        "weights of .*truncated are corrupt or truncated", [], []),
    "generate from a checkpoint without tokenizer files": (["generate", "{ws}/notokenizer", "--prompt", "w1"], 2,
                                                           "cannot load the tokenizer of .*notokenizer", [], []),
    "generate from a binary prompts file": (["generate", "{ws}/dlm", "--prompts-file", "{ws}/data/binary.txt"], 2,
                                            "is not UTF-8 text", [], []),
    "eval on a device this machine lacks": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--device", "nodev:0"],
                                            2, "is not available here", [], []),
    # output locations that cannot hold a new directory, or are not what they are named
    "convert under a file": (["convert", "{ws}/models/src", "{ws}/work/keep.txt/out"], 2, "which is not a directory",
                             WORK, ["work/keep.txt/out"]),
    "convert onto a dangling link": (["convert", "{ws}/models/src", "{ws}/dangling"], 2, "is a symbolic link",
                                     [], []),
    "convert onto a link loop": (["convert", "{ws}/models/src", "{ws}/loop1"], 2, "is a symbolic link", [], []),
    # a checkpoint that is not whole is never resumed from
    "resume when the only checkpoint has no manifest": ([*TRAIN, "output_dir={ws}/trainrun", "resume=true"], 2,
                                                        "holds no complete checkpoint \\(step-00000002: no manifest",
                                                        ["trainrun/metrics.jsonl", f"{STEP}/optimizer.pt"],
                                                        ["trainrun/final"]),
    "resume from a named incomplete checkpoint": ([*TRAIN, "output_dir={ws}/trainrun", "resume={ws}/" + STEP], 2,
                                                  "the checkpoint is incomplete", ["trainrun/metrics.jsonl",
                                                                                   f"{STEP}/state.json"],
                                                  ["trainrun/final"]),
    # data files: the file, the line and what was expected, not "An error occurred while generating the dataset"
    "train on an empty .txt": ([*TRAIN, "output_dir={ws}/run", "data.train={ws}/data/empty.txt"], 2,
                               "data file .*empty.txt is empty; expected UTF-8 text", [], ["run/final"]),
    "train on an empty .jsonl": ([*TRAIN, "output_dir={ws}/run", "data.train={ws}/data/empty.jsonl"], 2,
                                 "empty.jsonl is empty; expected one JSON object per line", [], ["run/final"]),
    "train on a .jsonl of blank lines": ([*TRAIN, "output_dir={ws}/run", "data.train={ws}/data/blank.jsonl"], 2,
                                         "blank.jsonl holds only blank lines", [], ["run/final"]),
    "train on a .jsonl broken at line 3": ([*TRAIN, "output_dir={ws}/run", "data.train={ws}/data/broken.jsonl"], 2,
                                           r"broken.jsonl line 3 is not valid JSON .*; expected one JSON object per",
                                           ["data/broken.jsonl"], ["run/final"]),
    "train on a .jsonl with a list at line 2": ([*TRAIN, "output_dir={ws}/run",
                                                 "data.train={ws}/data/listline.jsonl"], 2,
                                                "listline.jsonl line 2 is a JSON list, not an object", [],
                                                ["run/final"]),
    "train on a .jsonl without a text column": ([*TRAIN, "output_dir={ws}/run",
                                                 "data.train={ws}/data/notext.jsonl"], 2,
                                                r"has no column 'text' \(columns: content\); set data.text_column",
                                                [], ["run/final"]),
    "train on a broken .json array": ([*TRAIN, "output_dir={ws}/run", "data.train={ws}/data/broken.json"], 2,
                                      "broken.json is not valid JSON at line 4", [], ["run/final"]),
    "train on a .txt that is not UTF-8": ([*TRAIN, "output_dir={ws}/run", "data.train={ws}/data/latin1.txt"], 2,
                                          "latin1.txt line 2 is not UTF-8 text", [], ["run/final"]),
    "train on a .parquet that is not Parquet": ([*TRAIN, "output_dir={ws}/run",
                                                 "data.train={ws}/data/garbage.parquet"], 2,
                                                "garbage.parquet is not a Parquet file", [], ["run/final"]),
    "train with a broken validation file": ([*TRAIN, "output_dir={ws}/run",
                                             "data.validation={ws}/data/broken.jsonl"], 2,
                                            "broken.jsonl line 3 is not valid JSON", [], ["run/final"]),
    "sft on an empty .jsonl": ([*SFT, "data.train={ws}/data/empty.jsonl"], 2, "empty.jsonl is empty", [],
                               ["run/final"]),
    "sft on a .jsonl broken at line 3": ([*SFT, "data.train={ws}/data/chat_broken.jsonl"], 2,
                                         "chat_broken.jsonl line 3 is not valid JSON", [], ["run/final"]),
    "sft on a .jsonl without messages": ([*SFT, "data.train={ws}/data/chat_nomessages.jsonl"], 2,
                                         "SFT needs a 'messages' column", [], ["run/final"]),
    "eval on an empty .txt": (["eval", "{ws}/dlm", "--data", "{ws}/data/empty.txt"], 2, "empty.txt is empty", [],
                              []),
    "eval on a .jsonl broken at line 3": (["eval", "{ws}/dlm", "--data", "{ws}/data/broken.jsonl"], 2,
                                          "broken.jsonl line 3 is not valid JSON", [], []),
    # never unpickled: the payload does not run, and the error is one line, not UnpicklingError's 36
    "convert a pickle that runs a command": (["convert", "{ws}/models/pickle", "{ws}/out"], 2,
                                             r"refusing the pickled weights in .*pickle: unpickling them calls "
                                             "posix.system", [], ["out", "work/PWNED"]),
    "convert a zipped pickle that runs a command": (["convert", "{ws}/models/zipped_pickle", "{ws}/out"], 2,
                                                    "refusing the pickled weights in .*zipped_pickle: unpickling "
                                                    "them calls posix.system", [], ["out", "work/PWNED"]),
    "upgrade a checkpoint with truncated weights": (["upgrade", "{ws}/truncated"], 2,
                                                    r"truncated cannot be used whatever its code: corrupt or "
                                                    "truncated safetensors file", ["truncated/config.json"], []),
    # contradictions and sizes that only fail later (exit 0 until now)
    "sft on messages whose content is a number": ([*SFT, "data.train={ws}/data/chat_int.jsonl"], 2,
                                                  r"chat_int.jsonl record 1: message 2 \(assistant\) has content 7, "
                                                  "not text", [], ["run"]),
    "sft on messages whose content is null": ([*SFT, "data.train={ws}/data/chat_null.jsonl"], 2,
                                              r"chat_null.jsonl record 3: message 1 \(user\) has content null",
                                              [], ["run"]),
    "generate at least 10 of at most 4 new tokens": (["generate", "{ws}/dlm", "--prompt", "w1", "--min-new-tokens",
                                                      "10", "--max-new-tokens", "4"], 2,
                                                     r"min_new_tokens \(10\) exceeds max_new_tokens \(4\)", [], []),
    "eval a sweep step beyond the sweep length": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--metrics",
                                                   "steps_sweep", "--sweep-steps", "3,32"], 2,
                                                  r"sweep steps must be between 1 and --sweep-length \(16\), got 32",
                                                  [], []),
    "push to a revision that is not a git ref": (["push", "{ws}/dlm", "me/x", "--dry-run", "--revision", "a..b~^:"],
                                                 2, r"--revision 'a..b~\^:' is not a valid branch name", [], []),
    "convert with a block larger than the model's positions": (["convert", "{ws}/models/src", "{ws}/blockout",
                                                                "--block-size", "100000"], 2,
                                                               "block size 100000 exceeds the model's 64 positions",
                                                               [], ["blockout"]),
    "train with a block larger than the model": ([*TRAIN, "output_dir={ws}/run", "anneal.mode=none",
                                                  "block.size=100000"], 2,
                                                 r"'block.size' \(100000\) exceeds data.seq_length \(8\)", [],
                                                 ["run"]),
    "train with blocks of 256 in rows of 128": ([*TRAIN, "output_dir={ws}/run", "anneal.mode=none", "block.size=256",
                                                 "data.seq_length=128"], 2,
                                                r"'block.size' \(256\) exceeds data.seq_length \(128\)", [], ["run"]),
    "train a block checkpoint on rows shorter than its blocks": ([*TRAIN, "output_dir={ws}/run", "anneal.mode=none",
                                                                  "model.path={ws}/blockdlm", "data.seq_length=2"], 2,
                                                                 r"block size 4, more than data.seq_length \(2\)",
                                                                 [], ["run"]),
    "train with a separator the tokenizer lacks": ([*TRAIN, "output_dir={ws}/run", "data.separator=<|endoftext|>"], 2,
                                                   "separator '<\\|endoftext\\|>' is not a token of the tokenizer's "
                                                   "vocabulary", [], ["run"]),
    "train with an ordinary word as the separator": ([*TRAIN, "output_dir={ws}/run", "data.separator=w2"], 2,
                                                     "separator 'w2' is an ordinary token of the text", [], ["run"]),
    "train with the mask token as the separator": ([*TRAIN, "model.path={ws}/models/src", "output_dir={ws}/run",
                                                    "model.mask_token=<pad>", "data.separator=<pad>"], 2,
                                                   "data.separator and model.mask_token name the same token", [],
                                                   ["run"]),
    "train a drafter on prompts with a separator": ([*DRAFTER, "data.separator=</s>"], 2,
                                                    "'data.separator' packs text, but drafter rows hold one prompt",
                                                    [], ["run"]),
    "eval with a separator but no text": (["eval", "{ws}/dlm", "--tasks", "toy", "--include-path", "{ws}",
                                           "--separator", "</s>"], 2, "--separator packs --data's documents", [], []),
    "eval lm-eval tasks with -1 few-shot examples": (["eval", "{ws}/dlm", "--tasks", "toy", "--include-path", "{ws}",
                                                      "--num-fewshot=-1"], 2,
                                                     "--num-fewshot must be 0 or more, got -1", [], []),
    "eval blocks of 1000 in sequences of 32": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--seq-length", "32",
                                                "--block-size", "1000"], 2,
                                               r"block_size \(1000\) exceeds seq_length \(32\)", [], []),
    "eval sequences longer than the model's positions": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt",
                                                          "--seq-length", "100"], 2,
                                                         "seq_length 100 exceeds the model's 64 positions", [], []),
    "eval a causal LM with a KV cache": (["eval", "{ws}/models/src", "--data", "{ws}/train.txt", "--kv-cache",
                                          "prefix"], 2, "--kv-cache is a diffusion checkpoint's decoding option",
                                         [], []),
    "generate with a decoding block on a block checkpoint": (["generate", "{ws}/blockdlm", "--prompt", "w1",
                                                              "--block-length", "2", "--max-new-tokens", "4"], 2,
                                                             "decodes its own blocks of 4 with an exact KV cache",
                                                             [], []),
    "generate with sub-blocks that do not divide the block": (["generate", "{ws}/blockdlm", "--prompt", "w1",
                                                               "--sub-block", "3"], 2,
                                                              r"sub_block \(3\) must divide the block size \(4\)",
                                                              [], []),
    "generate from a checkpoint whose block exceeds its positions": (["generate", "{ws}/hugeblock", "--prompt",
                                                                      "w1"], 2,
                                                                     "has block size 100000, more than its model's 64 "
                                                                     "positions", [], []),
    "stream with a decoding block on a block checkpoint": (["generate", "{ws}/blockdlm", "--prompt", "w1", "--stream",
                                                            "--kv-cache", "prefix"], 2,
                                                           "decodes its own blocks of 4 with an exact KV cache",
                                                           [], []),
    "eval an infill span longer than the sequence": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--metrics",
                                                      "infill", "--seq-length", "16", "--infill-span", "15"], 2,
                                                     r"infill span must be between 1 and seq_length − 2 \(14\)",
                                                     [], []),
    "eval with an AR parent that is not there": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--metrics",
                                                  "infill", "--seq-length", "16", "--ar-parent", "{ws}/nowhere"], 2,
                                                 "--ar-parent .*nowhere not found", [], []),
    # argparse and YAML errors: one line too, not a usage block or a quoted excerpt with a caret
    "convert with a block size that is not a number": (["convert", "{ws}/models/src", "{ws}/blockout",
                                                        "--block-size", "abc"], 2,
                                                       "invalid int value: 'abc'; see dlm-adapt convert --help", [],
                                                       ["blockout"]),
    "eval --metrics without a value": (["eval", "{ws}/dlm", "--metrics"], 2,
                                       "--metrics: expected one argument; see dlm-adapt eval --help", [], []),
    "train from a recipe that is not YAML": (["train", "{ws}/badyaml.yaml", "output_dir={ws}/run"], 2,
                                             r"badyaml.yaml is not valid YAML at line \d+, column \d+: ", [],
                                             ["run"]),
    # converting our own output: not "contains custom code"
    "convert a dlm-adapt checkpoint": (["convert", "{ws}/dlm", "{ws}/out"], 2,
                                       r"already a dlm-adapt diffusion checkpoint.*dlm-adapt upgrade .*dlm-adapt "
                                       "train`/`sft`", ["dlm/config.json"], ["out"]),
    # push uploads what a link points to: one leaving DIR could publish a token
    "push a checkpoint with a link to a file outside it": (["push", "{ws}/linked", "me/x", "--dry-run"], 2,
                                                           "linked/hf_token is a symbolic link to .*mine.txt, "
                                                           "outside", ["user/mine.txt"], []),
    "push a checkpoint whose README.md links outside it": (["push", "{ws}/readmelink", "me/x", "--dry-run"], 2,
                                                           "readmelink/README.md is a symbolic link", [], []),
    "push a training checkpoint": (["push", "{ws}/" + STEP, "me/x", "--dry-run"], 2, "not a dlm-adapt checkpoint",
                                   [], []),
    "eval --json naming a directory": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--json", "{ws}/jsondir"], 2,
                                       "is a directory; name a file", [], []),
    "convert onto a file": (["convert", "{ws}/models/src", "{ws}/train.txt", "--overwrite"], 2,
                            "exists and is not a directory", ["train.txt"], []),
    "eval --json into a file's child": (["eval", "{ws}/dlm", "--data", "{ws}/train.txt", "--json",
                                         "{ws}/work/keep.txt/out.json"], 2, "cannot be written", WORK, []),
}


def _snapshot(ws: Path, paths: list[str]) -> dict:
    return {p: (ws / p).read_bytes() for p in paths}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_changes_nothing(ws, case, capsys):
    argv, code, phrase, kept, absent = CASES[case]
    before = _snapshot(ws, kept)
    capsys.readouterr()
    assert main([a.format(ws=ws) for a in argv]) == code
    errors = capsys.readouterr().err.strip().splitlines()  # no progress bar or library warning before it
    assert len(errors) == 1 and errors[0].startswith("dlm-adapt: error: "), errors
    assert re.search(phrase, errors[0]), errors[0]
    assert _snapshot(ws, kept) == before
    assert [p for p in absent if (ws / p).exists()] == []
    assert [p.name for p in ws.rglob(".*.tmp-*")] == []  # no temporary directory left behind


REFUSED_BEFORE_LOADING = ["generate at temperature -1", "generate with top-p 5", "generate with top-k -3",
                          "generate -2 new tokens", "generate 0 new tokens without holes", "generate with 0 steps",
                          "generate with threshold 2", "generate 10 new tokens in blocks of 4",
                          "generate at least 10 of at most 4 new tokens",
                          "generate with a decoding block on a block checkpoint",
                          "generate with sub-blocks that do not divide the block",
                          "generate from a checkpoint whose block exceeds its positions",
                          "stream with a decoding block on a block checkpoint"]


@pytest.mark.parametrize("case", REFUSED_BEFORE_LOADING)
def test_bad_sampling_options_are_refused_before_the_model_loads(base, case, capsys, monkeypatch):
    """Not a line of weight-loading progress before the error: the model is never loaded."""
    import adapt.checkpoint
    import adapt.sampling.generate

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(adapt.sampling.generate, "load", load)
    monkeypatch.setattr(adapt.checkpoint, "load", load)  # --stream loads it itself
    argv, code, phrase, _, _ = CASES[case]
    capsys.readouterr()
    assert main([a.format(ws=base) for a in argv]) == code
    stderr = capsys.readouterr().err.splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("dlm-adapt: error: ") and re.search(phrase, stderr[0]), stderr


EVAL_REFUSED_BEFORE_LOADING = ["eval blocks of 1000 in sequences of 32",
                               "eval sequences longer than the model's positions", "eval a causal LM with a KV cache",
                               "eval an infill span longer than the sequence",
                               "eval with an AR parent that is not there",
                               "eval lm-eval tasks with -1 few-shot examples",
                               "eval a sweep step beyond the sweep length"]


@pytest.mark.parametrize("case", EVAL_REFUSED_BEFORE_LOADING)
def test_bad_eval_options_are_refused_before_the_model_loads(base, case, capsys, monkeypatch):
    import importlib

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(importlib.import_module("adapt.evaluation.harness"), "_load", load)
    argv, code, phrase, _, _ = CASES[case]
    capsys.readouterr()
    assert main([a.format(ws=base) for a in argv]) == code
    stderr = capsys.readouterr().err.splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("dlm-adapt: error: ") and re.search(phrase, stderr[0]), stderr


def test_readme_infill_example_fills_every_hole(ws, capsys):
    assert main(["generate", str(ws / "dlm"), "--infill", "w1 <|mask|> <|mask|> <|mask|> w5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 3 and len(result["tokens"]) == 5  # one pass per hole, by default
    assert result["text"].startswith("w1 ") and result["text"].endswith(" w5") and "mask" not in result["text"]


RANGES = {  # override: the key named in the error (None: a boundary value that is valid)
    "train.lr=0": "train.lr", "log_steps=0": "log_steps", "lora.dropout=1": "lora.dropout",
    "anneal.anneal_steps=0": "anneal.anneal_steps", "data.validation_fraction=1": "data.validation_fraction",
    "objective.cart_p=0": "objective.cart_p", "train.batch_size=0": "train.batch_size", "stop_after=0": "stop_after",
    "train.max_grad_norm=-1": "train.max_grad_norm", "objective.eps=nan": "objective.eps", "train.lr=nan": "train.lr",
    "train.lr=-1": "train.lr",
    "save_steps=0": None, "eval_steps=0": None, "data.validation_fraction=0": None, "train.betas=[0, 0.999]": None,
}


@pytest.mark.parametrize("override", RANGES)
def test_numeric_config_ranges(override):
    from adapt import AdaptError
    from adapt.config import load_config

    key = RANGES[override]
    if key is None:
        load_config(None, [override])
    else:
        with pytest.raises(AdaptError, match=rf"config key '{re.escape(key)}' must be in "):
            load_config(None, [override])


def test_sft_ranges_name_the_section():
    from adapt import AdaptError
    from adapt.config import SFTConfig, load_config

    with pytest.raises(AdaptError, match=r"'data.max_length' must be in \[2, inf\), got 1"):
        load_config(None, ["data.max_length=1"], cls=SFTConfig)


def test_upgrade_of_a_read_only_checkpoint_is_one_line(ws, capsys, monkeypatch):
    """Outdated code in a directory the user cannot write: one line naming the file and the fix. Tests run as root,
    whom permissions do not stop, so there the kernel's refusal is simulated where upgrade creates its file."""
    import tempfile

    stale = ws / "dlm" / "block_masked_diffusion.py"
    stale.write_text(stale.read_text() + "# an older release\n")
    files = {p: p.read_bytes() for p in (ws / "dlm").iterdir()}
    mode = (ws / "dlm").stat().st_mode
    (ws / "dlm").chmod(0o555)
    try:
        if os.geteuid() == 0:
            def refuse(*args, dir=None, prefix="", **kwargs):
                raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x"))

            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        capsys.readouterr()
        assert main(["upgrade", str(ws / "dlm")]) == 2
    finally:
        (ws / "dlm").chmod(mode)
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert re.fullmatch(r"dlm-adapt: error: cannot write .*/dlm/\S+: permission denied; nothing changed\. Make "
                        r".*/dlm and its files writable \(chmod -R u\+w\), or upgrade a copy of it", errors[0]), errors
    assert {p: p.read_bytes() for p in (ws / "dlm").iterdir()} == files


def test_block_size_is_bounded_by_seq_length_only_where_text_is_packed():
    from adapt import AdaptError
    from adapt.config import EvalOptions

    assert EvalOptions(tasks="toy", block_size=256).block_size == 256  # lm-eval's sequences: up to the positions
    with pytest.raises(AdaptError, match=r"block_size \(256\) exceeds seq_length \(128\)"):
        EvalOptions(data="d.txt", block_size=256)
