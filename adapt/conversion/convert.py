"""`dlm-adapt convert`: a causal checkpoint becomes a masked diffusion checkpoint that loads with transformers
alone (remote code), keeping every weight of the source.

Everything is written to a temporary directory beside OUTPUT and renamed into place at the end, so a failed
conversion leaves nothing that looks like a checkpoint, and an existing OUTPUT survives until the new one is
complete. Only a previous conversion output is ever replaced (see `outputs`).
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from .. import __version__
from .architectures import check_architecture
from ..checkpoint import DIFFUSION, detect
from ..config import DTYPES, ConvertOptions
from .drafter import drafter_spec, drafter_tensors
from ..errors import AdaptError
from ..sources import Source, load_causal, resolve_source
from ..outputs import check_target, make_temp, publish, write_errors
from ..model import MaskedDiffusionConfig, write_remote_code
from ..safetensors_io import StoredTensor, dtype_code, read_shards, torch_dtype, write_safetensors

DEFAULT_MASK_TOKEN = "<|mask|>"
PREFIX = "decoder."  # where MaskedDiffusionLM keeps the causal LM
FLAG = "--overwrite (overwrite=True)"
ADVICE = f"pass {FLAG} to replace it, or choose a new directory"
DEFAULT_DECODING = {"max_new_tokens": 128, "steps": 128, "block_length": 128, "remasking": "low_confidence"}


def convert(source: str | Path, output: str | Path, **options) -> Path:
    """Convert a causal LM into a masked diffusion checkpoint at `output`; returns the output path.

    `source` is a local Hugging Face model directory, a `.gguf` file, or a Hub model id. `output` is the directory
    to create; an existing non-empty one is refused unless it is a previous conversion output and `overwrite` is
    set. `options` are the fields of `adapt.config.ConvertOptions` (mask_token, shift, dtype, revision, gguf_file,
    trust_remote_code, overwrite, block_size, drafter, drafter_rank, drafter_alpha, drafter_targets), documented
    there. With `drafter` the
    checkpoint also holds an untrained drafter adapter for speculative decoding (`adapt.conversion.drafter`).
    """
    o = ConvertOptions(**options)
    if not str(output).strip():
        raise AdaptError("output path is empty; name the directory to create")
    output = Path(output).expanduser().absolute()
    local = Path(source).expanduser()
    # checked before a Hub source is downloaded, and again once the source is a local directory
    check_target(output, "convert", o.overwrite, {"source": local} if local.exists() else {}, ADVICE)
    src = resolve_source(source, o.revision, o.gguf_file, o.trust_remote_code)
    replace = check_target(output, "convert", o.overwrite, {"source": src.directory}, ADVICE)
    _refuse_diffusion_source(src, source)

    streamed = src.gguf_file is None and _has_safetensors(src.directory)
    # GGUF and pickle-free non-safetensors sources: transformers loads (dequantises) the model once
    causal = load_causal(src, trust_remote_code=o.trust_remote_code, weights=not streamed, dtype="auto",
                         check=lambda config: _check_config(config, o.block_size))
    config, tokenizer = causal.config, causal.tokenizer

    tmp = make_temp(output, "convert")
    try:
        with write_errors(output):
            writer = _StreamedWeights(src.directory, config) if streamed else _LoadedWeights(causal.model)
            pad_case = ensure_pad_token(tokenizer)
            mask_id, case = choose_mask_token(tokenizer, writer.vocab_rows, o.mask_token)
            drafter = (drafter_spec(writer.config, o.drafter_rank, o.drafter_alpha, o.drafter_targets) if o.drafter
                       else None)
            extra = {} if drafter is None else drafter_tensors(writer.config, drafter, mask_id,
                                                               _weight_dtype(o.dtype, writer.config))
            writer.write(tmp, new_rows=max(0, mask_id + 1 - writer.vocab_rows), dtype=DTYPES.get(o.dtype),
                         extra=extra)
            config = writer.config
            if o.dtype != "auto":
                config.dtype = o.dtype
            provenance = {
                "converter": "dlm-adapt",
                "converter_version": __version__,
                "source": str(source),
                # a relative local path can look like a Hub id; only this says where the source came from
                "source_from_hub": src.from_hub,
                "revision": o.revision,
                "gguf_file": src.gguf_file,
                "base_model_type": config.model_type,
                "mask_token_case": case,
                "pad_token_case": pad_case,
            }
            _write_config(tmp, config, mask_id, o.shift, provenance, o.block_size, drafter)
            _write_generation_config(tmp, tokenizer, config, mask_id, o.block_size)
            tokenizer.save_pretrained(tmp)
            tokenizer_config = tmp / "tokenizer_config.json"
            policy = padding_policy(json.loads(tokenizer_config.read_text()))
            tokenizer_config.write_text(json.dumps(policy, indent=2) + "\n")
            _check_tokenizer_reads_back(tmp, tokenizer, mask_id, source)
            for f in _license_files(src):
                shutil.copyfile(f, tmp / f.name)
        publish(tmp, output, "convert", replace, FLAG)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


PROBE_TEXT = "The capital of France is Paris. Once upon a time, 3 + 4 = 7!"


def _check_tokenizer_reads_back(directory: Path, tokenizer: PreTrainedTokenizerBase, mask_id: int, source):
    """The tokenizer as written, loaded as every user of the checkpoint loads it, must encode text as the source's
    does and know [MASK] by the model's id. Some transformers releases write a tokenizer that reads back
    differently (5.5.0, with SmolLM2's GGUF: a CodeLlama tokenizer that splits every word with <|endoftext|>),
    which would make every prompt, answer and sample of the checkpoint wrong."""
    from transformers import __version__ as transformers_version

    config = MaskedDiffusionConfig.from_pretrained(directory)
    reloaded = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, config=config)
    want = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    got = reloaded.encode(PROBE_TEXT, add_special_tokens=False)
    if got != want or reloaded.mask_token_id != mask_id:
        raise AdaptError(f"the tokenizer transformers {transformers_version} writes for {source} does not read back "
                         f"the same (a probe sentence encodes to {len(got)} tokens, not {len(want)}; [MASK] is id "
                         f"{reloaded.mask_token_id}, not {mask_id}); a newer transformers writes it correctly: "
                         "pip install -U transformers")


def _license_files(src: Source) -> list[Path]:
    """LICENSE* files that are regular files inside the source; a link out of a local source directory could
    copy anything readable (a token, a key) into a checkpoint that is later published. A Hub download is a tree
    of links into the cache's blob store, which is inside the cached repo."""
    root = src.directory.parents[1] if src.from_hub else src.directory
    found = []
    for f in sorted(src.directory.glob("LICENSE*")):
        target = f.resolve()
        if target.is_file() and target.is_relative_to(root.resolve()):
            found.append(f)
        elif f.is_symlink():
            print(f"dlm-adapt: warning: not copying {f}: it links to {target}, outside the source directory",
                  file=sys.stderr)
    return found


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """Batched prompts need a pad token. A source without one gets its EOS as pad (only ever attention-masked, so
    the id is never read; the mask token is chosen distinct from both). Returns `existing`, `eos` or `none`."""
    if tokenizer.pad_token is not None:
        return "existing"
    if tokenizer.eos_token is None:
        return "none"
    tokenizer.pad_token = tokenizer.eos_token
    return "eos"


def padding_policy(tokenizer_config: dict) -> dict:
    """A checkpoint's `tokenizer_config.json` as batched `diffusion_generate` needs it: padding on the left (the
    canvas continues after each prompt) and, as `ensure_pad_token`, EOS as pad where there is no pad token."""
    updated = dict(tokenizer_config, padding_side="left")
    if updated.get("pad_token") is None and updated.get("eos_token") is not None:
        updated["pad_token"] = updated["eos_token"]
    return updated


def choose_mask_token(tokenizer: PreTrainedTokenizerBase, vocab_rows: int, spec: str | int) -> tuple[int, str]:
    """Pick the [MASK] id and register it as the tokenizer's mask token. Returns (id, case) where case is
    `existing`, `spare_row` (an embedding row beyond the tokenizer, no resize), `added` (new row: resize) or
    `specified` (the user named it)."""
    vocab = tokenizer.get_vocab()
    if spec == "auto":
        if tokenizer.mask_token is not None:
            mask_id, case = tokenizer.mask_token_id, "existing"
        elif DEFAULT_MASK_TOKEN in vocab:
            mask_id, case = vocab[DEFAULT_MASK_TOKEN], "existing"
        else:
            mask_id = len(tokenizer)
            case = "spare_row" if mask_id < vocab_rows else "added"
            tokenizer.add_special_tokens({"mask_token": DEFAULT_MASK_TOKEN})
            if tokenizer.mask_token_id != mask_id:
                raise AdaptError(f"adding {DEFAULT_MASK_TOKEN} gave id {tokenizer.mask_token_id}, expected {mask_id}; "
                                 "pass --mask-token with an explicit token or id")
    elif isinstance(spec, int) or str(spec).isdigit():
        mask_id, case = int(spec), "specified"
        if not 0 <= mask_id < min(vocab_rows, len(tokenizer)):
            raise AdaptError(f"mask token id {mask_id} is outside the vocabulary (tokenizer has {len(tokenizer)} "
                             f"tokens, embedding {vocab_rows} rows)")
    else:
        case = "specified"
        if spec in vocab:
            mask_id = vocab[spec]
        else:
            ids = tokenizer.encode(spec, add_special_tokens=False)
            if len(ids) != 1:
                raise AdaptError(f"mask token {spec!r} is not a single token: it encodes to {len(ids)} tokens. "
                                 "Pass a token already in the vocabulary, a token id, or 'auto'")
            mask_id = ids[0]
    forbidden = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "unk": tokenizer.unk_token_id}
    eos = tokenizer.eos_token_id
    for i in eos if isinstance(eos, list) else [eos]:
        forbidden.setdefault("eos", i)
    for role, tid in forbidden.items():
        if tid is not None and tid == mask_id:
            raise AdaptError(f"mask token id {mask_id} is the {role} token; the mask must be a distinct token. "
                             "Pass --mask-token with another token or id")
    if tokenizer.mask_token_id != mask_id:
        tokenizer.add_special_tokens({"mask_token": tokenizer.convert_ids_to_tokens(mask_id)})
    return mask_id, case


def _refuse_diffusion_source(src: Source, source):
    """Our own checkpoints name remote code in auto_map; without this, transformers' refusal to run it ("contains
    custom code") would be the error, and it points the wrong way."""
    if src.gguf_file is not None:
        return
    if detect(src.directory).kind == DIFFUSION:  # an unreadable config is _load_config's to report
        raise AdaptError(f"{source} is already a dlm-adapt diffusion checkpoint: nothing to convert. Run `dlm-adapt "
                         f"upgrade {source}` to refresh its code, or `dlm-adapt train`/`sft` with model.path={source} "
                         "to train it further")


def _check_config(config, block_size: int | None):
    """What the source's config alone rules out, said before its tokenizer and weights load."""
    check_architecture(config)
    positions = getattr(config, "max_position_embeddings", None)
    if block_size is not None and positions is not None and block_size > positions:
        raise AdaptError(f"block size {block_size} exceeds the model's {positions} positions "
                         f"(max_position_embeddings): no block could be decoded; use --block-size {positions} or less")


def _has_safetensors(directory: Path) -> bool:
    return (directory / "model.safetensors.index.json").is_file() or (directory / "model.safetensors").is_file()


def _mean_rows(weight: torch.Tensor, n: int) -> torch.Tensor:
    """`n` rows, each the mean of the rows of `weight` (a neutral start for [MASK])."""
    return weight.float().mean(0, keepdim=True).to(weight.dtype).expand(n, *weight.shape[1:])


def _vocab_param_names(model) -> set[str]:
    """Names of the parameters whose first dimension is the vocabulary (input embedding, LM head and its bias)."""
    targets = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        targets.add(id(out.weight))
        if getattr(out, "bias", None) is not None:
            targets.add(id(out.bias))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in targets}


class _StreamedWeights:
    """A safetensors source, rewritten shard by shard without ever loading the whole model."""

    def __init__(self, directory: Path, config):
        self.config = config
        self.shards = read_shards(directory)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        expected = set(skeleton.state_dict())
        top_level = {n.split(".")[0] for n in expected}
        prefix = skeleton.base_model_prefix

        # Names stay as stored on disk: transformers' own checkpoint conversion (e.g. per-expert MoE weights
        # fused in memory) applies on load, scoped to `decoder.`. Only checkpoints saved from the bare base
        # model (no `model.`/`transformer.` prefix) are renamed.
        self.names = {
            name: name if name.split(".")[0] in top_level else f"{prefix}.{name}"
            for tensors in self.shards.values()
            for name in tensors
        }
        present = set(self.names.values())
        if get_checkpoint_conversion_mapping(config.model_type) is None:
            groups = {}
            for n, p in skeleton.named_parameters(remove_duplicate=False):
                groups.setdefault(id(p), []).append(n)
            tied = {n: g for g in groups.values() for n in g}
            missing = [n for n in expected if n not in present and not any(t in present for t in tied.get(n, []))]
            if missing:
                raise AdaptError(f"the checkpoint lacks {len(missing)} weights of the {config.model_type} model "
                                 f"(e.g. {sorted(missing)[0]}); it is incomplete or not this architecture")
            unexpected = sorted(present - expected)
            if unexpected:
                print(f"dlm-adapt: warning: {len(unexpected)} checkpoint tensors are not used by the "
                      f"{config.model_type} model and are dropped (e.g. {unexpected[0]})", file=sys.stderr)
                self.names = {k: v for k, v in self.names.items() if v in expected}
        _check_shapes(self.shards, self.names, skeleton, config.model_type)
        self.vocab_names = _vocab_param_names(skeleton)
        embed_name = next(n for n, p in skeleton.named_parameters(remove_duplicate=False)
                          if p is skeleton.get_input_embeddings().weight)
        embed = next((k for k, v in self.names.items() if v == embed_name), None)
        if embed is None:
            raise AdaptError(f"the checkpoint has no input embedding tensor ({embed_name})")
        self.vocab_rows = next(t[embed].shape[0] for t in self.shards.values() if embed in t)

    def write(self, out_dir: Path, new_rows: int, dtype: torch.dtype | None, extra: dict | None = None):
        """`extra`: more tensors (the drafter adapter's), stored as they are in the last shard."""
        weight_map, total = {}, 0
        last = list(self.shards)[-1]
        for shard, tensors in self.shards.items():
            entries, shapes = {}, {}
            if shard == last:
                _add_tensors(entries, shapes, extra)
                weight_map.update({name: shard for name in extra or {}})
            for name, stored in tensors.items():
                if name not in self.names:
                    continue
                out_name = PREFIX + self.names[name]
                code, shape = stored.dtype, list(stored.shape)
                cast = dtype is not None and torch_dtype(code).is_floating_point and torch_dtype(code) != dtype
                grow = new_rows and self.names[name] in self.vocab_names
                if cast:
                    code = dtype_code(dtype)
                if grow:
                    shape[0] += new_rows
                entries[out_name] = stored if not (cast or grow) else _transform(stored, new_rows if grow else 0, dtype)
                shapes[out_name] = (code, shape)
                weight_map[out_name] = shard
            total += write_safetensors(out_dir / shard, entries, shapes)
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if new_rows:
            self.config.vocab_size = self.vocab_rows + new_rows


def _check_shapes(shards: dict, names: dict, skeleton, model_type: str):
    """A config.json that disagrees with the weights would convert into a checkpoint that cannot load."""
    expected = skeleton.state_dict()
    for tensors in shards.values():
        for name, stored in tensors.items():
            want = expected.get(names.get(name))
            if want is not None and tuple(stored.shape) != tuple(want.shape):
                raise AdaptError(f"config.json does not match the weights: {name} has shape {tuple(stored.shape)}, "
                                 f"but the {model_type} config implies {tuple(want.shape)}; fix config.json "
                                 "(e.g. hidden_size, vocab_size) or use the checkpoint's own config")


def _transform(stored: StoredTensor, new_rows: int, dtype: torch.dtype | None):
    def load():
        t = stored.load()
        pieces = [t, _mean_rows(t, new_rows)] if new_rows else [t]
        return [p.to(dtype) if dtype is not None and p.is_floating_point() else p for p in pieces]

    return load


class _LoadedWeights:
    """A source that transformers loaded whole (`load_causal`): GGUF (dequantised) or pickle-free non-safetensors."""

    def __init__(self, model):
        self.model = model
        self.config = self.model.config
        self.vocab_rows = self.model.get_input_embeddings().weight.shape[0]

    def write(self, out_dir: Path, new_rows: int, dtype: torch.dtype | None, extra: dict | None = None):
        model = self.model
        if new_rows:
            old = self.vocab_rows
            model.resize_token_embeddings(old + new_rows, mean_resizing=False)
            grown = _vocab_param_names(model)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in grown:
                        p[old:] = _mean_rows(p[:old], new_rows)
        entries, shapes, seen = {}, {}, set()
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:  # tied weights are stored once, like save_pretrained does
                continue
            seen.add(t.data_ptr())
            t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            entries[PREFIX + name] = lambda t=t: [t]
            shapes[PREFIX + name] = (dtype_code(t.dtype), list(t.shape))
        _add_tensors(entries, shapes, extra)
        write_safetensors(out_dir / "model.safetensors", entries, shapes)


def _add_tensors(entries: dict, shapes: dict, tensors: dict | None):
    for name, t in (tensors or {}).items():
        entries[name] = lambda t=t: [t]
        shapes[name] = (dtype_code(t.dtype), list(t.shape))


def _weight_dtype(option: str, config) -> torch.dtype:
    """The dtype the output's weights have: the option's, else the source config's, else float32."""
    if option != "auto":
        return DTYPES[option]
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _write_config(out_dir: Path, text_config, mask_id: int, shift: bool, provenance: dict, block_size=None,
                  drafter=None):
    text_config.is_causal = False
    text_config._name_or_path = ""  # a local path would leak into a published checkpoint
    # GGUF weights are dequantized on load, so the output is plain; a kept GGUF quantization_config would make
    # transformers refuse to save the model again (e.g. at the end of training)
    if getattr(text_config, "quantization_config", None) is not None and \
            dict(text_config.quantization_config).get("quant_method") == "gguf":
        del text_config.quantization_config
    config = MaskedDiffusionConfig(text_config=text_config, mask_token_id=mask_id, shift=shift, bidirectional=True,
                                   provenance=provenance, block_size=block_size, drafter=drafter)
    write_remote_code(config, out_dir, config.save_pretrained)


def _write_generation_config(out_dir: Path, tokenizer, config, mask_id: int, block_size=None):
    decoding = dict(DEFAULT_DECODING, **({"block_length": block_size} if block_size is not None else {}))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=mask_id,
        **decoding,
    )
    gen.save_pretrained(out_dir)

