"""`dlm-adapt generate` / `adapt.generate`: prompts in, decoded text and decoding statistics out."""

import dataclasses
import sys
import threading
from pathlib import Path

import torch

from ..config.commands import SamplingOptions
from ..errors import AdaptError
from ..checkpoint import load
from ..training.sft_data import user_turns
from ..model.block_masked_diffusion import check_block_options
from . import SamplingError, check_sampling_options


def generate(model, prompts: list[str], *, tokenizer=None, chat: bool = False, infill: bool = False,
             show_steps: bool = False, seed: int | None = None, streamer=None, sampling: SamplingOptions | None = None,
             **options) -> list[dict]:
    """Decode each prompt (batched, left-padded). `model` is a loaded model or a checkpoint path. With
    `infill`, each prompt is a text whose mask-token strings are holes to fill. The decoding settings are
    `sampling` (`adapt.config.SamplingOptions`) and/or its fields as keywords in `options` (`max_new_tokens=64`,
    `steps=...`; a keyword replaces the field); unset ones default to the checkpoint's generation_config.json.
    Every option is checked before a model loads. `streamer` (e.g. transformers' `TextStreamer`; one prompt) gets each block's
    tokens as soon as they are final. Returns one dict per prompt: `prompt`, `text` (the generated part, or the
    filled text for infilling), `tokens`, the row's own `nfe` (forward passes it needed: the same as decoding it
    alone) and `tokens_per_forward`; block-diffusion checkpoints add the batch's `cache_hits` and
    `positions_computed` (see `SamplingOutput`); speculative decoding (`speculative=True`, `draft_length`) adds the
    row's `rounds` (the rounds that verified drafts, one forward each; `nfe` = rounds + 1 with the prompt's
    prefill) and `acceptance`, per draft position the fraction of those rounds in which the parent accepted it."""
    o = dataclasses.replace(sampling or SamplingOptions(), **options)
    n = check_options(model, prompts, o, infill=infill, streaming=streamer is not None, show_steps=show_steps)
    if isinstance(model, (str, Path)):
        model, tokenizer = load(model)
    if tokenizer is None:
        raise AdaptError("pass the tokenizer with the model")
    texts = prompts
    if chat:
        texts = user_turns(tokenizer, prompts, "--chat")
    if infill and tokenizer.mask_token and not any(tokenizer.mask_token in t for t in texts):
        raise AdaptError(f"--infill text has no {tokenizer.mask_token} marking a hole")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # padding is masked out by attention_mask; any non-mask id will do
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    try:
        out = model.diffusion_generate(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                       generator=generator, return_dict_in_generate=True, return_history=show_steps,
                                       streamer=streamer, **dict(o.kwargs(), max_new_tokens=n))
    except SamplingError as e:
        raise AdaptError(str(e)) from e
    if show_steps:
        start = 0 if infill else batch.input_ids.shape[1]  # infilling shows the whole text, else the new part
        for i, canvas in enumerate(out.history):
            shown = tokenizer.decode(canvas[0, start:])
            print(f"[step {i + 1:3d}] {shown.replace(tokenizer.mask_token, '░')}", file=sys.stderr)
    results = []
    eos = tokenizer.eos_token_id
    for row, prompt in enumerate(prompts):
        real = batch.attention_mask[row].bool()
        seq = out.sequences[row].cpu()
        generated = seq[batch.input_ids.shape[1]:] if not infill else seq[: batch.input_ids.shape[1]][real]
        ids = generated.tolist()
        if not infill and eos in ids:
            ids = ids[: ids.index(eos)]
        results.append({"prompt": prompt, "text": tokenizer.decode(ids, skip_special_tokens=True), "tokens": ids,
                        "nfe": int(out.row_nfe[row]),
                        "tokens_per_forward": int(out.row_committed[row]) / max(1, int(out.row_nfe[row]))})
        if out.cache_hits is not None:
            results[-1].update(cache_hits=out.cache_hits, positions_computed=out.positions_computed)
        if getattr(out, "row_rounds", None) is not None:  # speculative: rounds, acceptance per draft position
            results[-1].update(rounds=int(out.row_rounds[row]), acceptance=out.acceptance[row].tolist())
            if getattr(out, "row_guessed", None) is not None:  # a loaded model whose code predates guessing has none
                results[-1]["guessed"] = int(out.row_guessed[row])
    return results


def check_options(model, prompts: list[str], sampling: SamplingOptions, *, infill: bool = False,
                  streaming: bool = False, show_steps: bool = False) -> int | None:
    """`generate`'s checks that need no weights (the options, and a checkpoint path's config.json); returns the
    number of new tokens to ask the sampler for (0 when infilling, None: the checkpoint's). `dlm-adapt serve`
    checks each request with it too."""
    if sampling.speculative or sampling.draft_length is not None or not sampling.guess_bonus:
        _check_speculative(sampling, infill, show_steps)
    max_new_tokens = sampling.max_new_tokens
    if max_new_tokens is not None and max_new_tokens < 0:
        raise AdaptError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    if max_new_tokens == 0 and not infill:  # the output is the new tokens alone
        raise AdaptError("nothing to decode: --max-new-tokens is 0; ask for new tokens, or give --infill TEXT with "
                         "holes to fill")
    if not prompts:
        raise AdaptError("no prompts given")
    if streaming and (len(prompts) > 1 or infill):
        raise AdaptError("streaming decodes one prompt, with new tokens (no --infill): give one prompt per call")
    n = 0 if infill else max_new_tokens
    try:
        check_sampling_options(**dict(sampling.kwargs(), max_new_tokens=n))
    except SamplingError as e:
        raise AdaptError(str(e)) from e
    if isinstance(model, (str, Path)):
        check_checkpoint_options(model, sampling)
    elif getattr(getattr(model, "config", None), "model_type", None) == "masked_diffusion_lm":
        _check_block_options(getattr(model.config, "block_size", None), sampling)  # a server checks each request
    return n


def check_checkpoint_options(path, sampling: SamplingOptions):
    """What a local checkpoint's config.json alone rules out, said before its weights load (the model's
    `diffusion_generate` says the same after): block options of a block-diffusion checkpoint, sub-blocks of a
    full-sequence one, a block larger than the model's positions."""
    from ..checkpoint import DIFFUSION, detect

    found = detect(path)
    if found.kind != DIFFUSION or not Path(path).expanduser().is_dir():
        return  # load() says what is wrong with it
    block = found.config.get("block_size")
    text = found.config.get("text_config") or {}
    positions = text.get("max_position_embeddings") or text.get("n_positions")
    if block is not None and positions is not None and block > positions:
        raise AdaptError(f"{path} has block size {block}, more than its model's {positions} positions: no block "
                         f"can be decoded; convert or train it again with a block size of at most {positions}")
    _check_block_options(block, sampling)


def _check_block_options(block: int | None, sampling: SamplingOptions):
    try:
        check_block_options(block, block_length=sampling.block_length, kv_cache=sampling.kv_cache,
                            sub_block=sampling.sub_block)
    except SamplingError as e:
        raise AdaptError(str(e)) from e


def _check_speculative(sampling: SamplingOptions, infill: bool, show_steps: bool):
    """Speculative decoding's own bad inputs, one line each, before a model loads."""
    k = sampling.draft_length
    if not sampling.speculative:
        flag = "--draft-length" if k is not None else "--no-guess-bonus"
        raise AdaptError(f"{flag} is the speculative drafter's: add --speculative")
    if k is not None and k < 1:
        raise AdaptError(f"--draft-length must be at least 1 (tokens drafted per pass), got {k}")
    if infill:
        raise AdaptError("--infill fills holes, --speculative continues a prompt with the parent's own tokens: use "
                         "one of them")
    if show_steps:
        raise AdaptError("--show-steps shows diffusion steps; speculative decoding has none: drop --show-steps")


def stream(model, prompt: str, *, tokenizer=None, **options):
    """Decode one prompt, yielding its text piece by piece as blocks become final (transformers'
    `TextIteratorStreamer`, decoding in a background thread). `options` are `generate`'s."""
    from transformers import TextIteratorStreamer

    if isinstance(model, (str, Path)):
        model, tokenizer = load(model)
    if tokenizer is None:
        raise AdaptError("pass the tokenizer with the model")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure = []

    def run():
        try:
            generate(model, [prompt], tokenizer=tokenizer, streamer=streamer, **options)
        except BaseException as e:  # handed to the caller below; end() so that its loop stops waiting
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]
