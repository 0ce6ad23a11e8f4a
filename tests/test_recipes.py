"""Every shipped recipe runs (torchtune's recipe test): it loads with the config loader and takes one optimizer
step through the real `train`/`sft` code path, on a tiny random model of the recipe's architecture and a few
lines of local data. No network, no real weights.

What is overridden, and why: model.path (the tiny stand-in: a causal source is converted into OUTPUT/converted as
the recipe does, a recipe starting from an adapted checkpoint gets a converted tiny one), data.train/validation
(local files instead of Hub datasets), the sizes (sequence length, batch, one step, no accumulation), and for SFT
a null chat_template becomes `default` (the tiny tokenizer has no template of its own), and a drafter recipe's
chat prompts get a tiny template. Everything else, the
method, dtype, mixed precision, gradient checkpointing, LoRA targets, objective and annealing, is the recipe's.
QLoRA needs bitsandbytes with CUDA: a qlora recipe runs here with method=lora, the rest of it unchanged.
"""

import json
import random
from pathlib import Path

import pytest

import adapt
from adapt.config import SFTConfig, TrainConfig, load_config
from tiny_models import WORDS, save_tiny_source, tiny_tokenizer, with_chat_template

ROOT = Path(__file__).resolve().parents[1] / "recipes"
ADAPTATION = sorted((ROOT / "adaptation").glob("*.yaml"))
SFT = sorted((ROOT / "sft").glob("*.yaml"))

# the tiny architecture (tests/tiny_models.py) standing in for each recipe's model, by its name
STAND_INS = {"qwen3": "qwen3", "qwen2.5": "qwen2", "llama": "llama", "smollm2": "llama", "stories260k": "llama"}


def stand_in(model_path: str) -> str:
    name = model_path.lower()
    for key, arch in STAND_INS.items():
        if key in name:
            return arch
    raise AssertionError(f"no tiny stand-in for model.path={model_path}: add its architecture to STAND_INS")


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def stand_ins(converted, tmp_path_factory):
    """stand_ins(arch) -> (causal source, converted checkpoint)."""
    made = {}

    def get(arch):
        if arch == "llama":
            return converted(arch)
        if arch not in made:
            # transformers loads a Qwen config's tokenizer as Qwen2Tokenizer, which rebuilds a byte-level BPE
            # from the word-level vocabulary and drops every word; as added tokens the words survive
            root = tmp_path_factory.mktemp(arch)
            save_tiny_source(root / "src", arch)
            tokenizer = tiny_tokenizer()
            tokenizer.add_tokens([f"w{i}" for i in range(WORDS)])
            tokenizer.save_pretrained(root / "src")
            adapt.convert(root / "src", root / "dlm")
            made[arch] = (root / "src", root / "dlm")
        return made[arch]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-data")
    rng = random.Random(0)
    words = [" ".join(f"w{i}" for i in range(s, s + rng.randrange(6, 12))) for s in (rng.randrange(4, 80)
                                                                                       for _ in range(60))]
    (root / "train.txt").write_text("\n\n".join(words))
    with open(root / "chat.jsonl", "w") as f:
        for i in range(40):
            a, b = rng.randrange(4, 90), rng.randrange(4, 90)
            messages = [{"role": "user", "content": f"w{a} w{a + 1}"}, {"role": "assistant", "content": f"w{b}"},
                        {"role": "user", "content": f"w{b} w{a}"}, {"role": "assistant", "content": f"w{a} w{b}"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return root


def _tiny_run(path: Path, cls, stand_ins, data: Path, out: Path):
    recipe = load_config(path, cls=cls)  # as shipped: it must load before anything is overridden
    source, dlm = stand_ins(stand_in(recipe.model.path))
    adapted = cls is SFTConfig and "/final" in recipe.model.path  # SFT of an adapted checkpoint
    overrides = [f"output_dir={out}", f"model.path={dlm if adapted else source}", "max_steps=1", "save_steps=0",
                 "eval_steps=1", "sample_steps=0", "train.batch_size=2", "train.gradient_accumulation_steps=1",
                 "data.validation=", "data.validation_fraction=0.1"]
    if recipe.train.method == "qlora":
        overrides.append("train.method=lora")  # QLoRA needs bitsandbytes with CUDA; the rest of the recipe stays
    if cls is SFTConfig:
        overrides += [f"data.train={data / 'chat.jsonl'}", "data.max_length=40", "data.max_eval_samples=2"]
        if recipe.data.chat_template is None:
            overrides.append("data.chat_template=default")
    else:
        block = recipe.block  # a row holds at least one whole block (a longer block is refused)
        length = max([16, *(s for s in (block.size, block.decay_to, *block.schedule) if s is not None)])
        overrides += [f"data.train={data / 'train.txt'}", "data.hub_config=", f"data.seq_length={length}",
                      "data.max_eval_sequences=2"]
        if recipe.drafter.enabled:  # the parent's continuations of a few prompts, within the tiny model's positions
            overrides += ["data.generate.prompts=4", "data.generate.prompt_length=4",
                          f"data.generate.new_tokens={length}", "data.generate.batch_size=4"]
            if recipe.data.generate.chat_message is not None:  # chat prompts need a template, which tiny lacks
                source = with_chat_template(source, out.parent / "chat-src")
                overrides[1] = f"model.path={source}"
    cfg = load_config(path, overrides, cls=cls)
    assert (cfg.train.method, cfg.model.dtype, cfg.train.mixed_precision) == (
        "lora" if recipe.train.method == "qlora" else recipe.train.method, recipe.model.dtype,
        recipe.train.mixed_precision)
    final = adapt.sft(cfg) if cls is SFTConfig else adapt.train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and ("val_tv" if cfg.drafter.enabled else "val_elbo") in records[0]
    assert (final / "config.json").is_file() or (final / "adapter_config.json").is_file()


@pytest.mark.parametrize("path", ADAPTATION, ids=lambda p: p.stem)
def test_adaptation_recipe_takes_a_step(path, stand_ins, data, tmp_path):
    _tiny_run(path, TrainConfig, stand_ins, data, tmp_path / "run")


@pytest.mark.parametrize("path", SFT, ids=lambda p: p.stem)
def test_sft_recipe_takes_a_step(path, stand_ins, data, tmp_path):
    _tiny_run(path, SFTConfig, stand_ins, data, tmp_path / "run")


def test_every_recipe_has_a_stand_in():
    assert len(ADAPTATION) >= 5 and len(SFT) >= 5
    for path in ADAPTATION + SFT:
        stand_in(load_config(path, cls=SFTConfig if path in SFT else TrainConfig).model.path)
