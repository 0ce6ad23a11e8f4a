"""`dlm-adapt generate` / `adapt.generate.generate`: prompts in, decoded text and decoding statistics out."""

import sys
import threading
from pathlib import Path

import torch

from ..errors import AdaptError
from ..checkpoint import load
from . import SamplingError, check_sampling_options


def generate(model, prompts: list[str], *, tokenizer=None, chat: bool = False, infill: bool = False,
             max_new_tokens: int | None = None, show_steps: bool = False, seed: int | None = None, streamer=None,
             **sampling) -> list[dict]:
    """Decode each prompt (batched, left-padded). `model` is a loaded model or a checkpoint path. With
    `infill`, each prompt is a text whose mask-token strings are holes to fill. `max_new_tokens` and the
    `diffusion_generate` options in `sampling` default to the checkpoint's generation_config.json. Every option is
    checked before a model loads. `streamer` (e.g. transformers' `TextStreamer`; one prompt) gets each block's
    tokens as soon as they are final. Returns one dict per prompt: `prompt`, `text` (the generated part, or the
    filled text for infilling), `tokens`, the row's own `nfe` (forward passes it needed: the same as decoding it
    alone) and `tokens_per_forward`; block-diffusion checkpoints add the batch's `cache_hits` and
    `positions_computed` (see `SamplingOutput`)."""
    if max_new_tokens is not None and max_new_tokens < 0:
        raise AdaptError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}")
    if max_new_tokens == 0 and not infill:  # the output is the new tokens alone
        raise AdaptError("nothing to decode: --max-new-tokens is 0; ask for new tokens, or give --infill TEXT with "
                         "holes to fill")
    if not prompts:
        raise AdaptError("no prompts given")
    if streamer is not None and (len(prompts) > 1 or infill):
        raise AdaptError("streaming decodes one prompt, with new tokens (no --infill): give one prompt per call")
    n = 0 if infill else max_new_tokens
    try:
        check_sampling_options(max_new_tokens=n, **sampling)
    except SamplingError as e:
        raise AdaptError(str(e)) from e
    if isinstance(model, (str, Path)):
        model, tokenizer = load(model)
    if tokenizer is None:
        raise AdaptError("pass the tokenizer with the model")
    texts = prompts
    if chat:
        if not tokenizer.chat_template:
            raise AdaptError("--chat: this tokenizer has no chat template")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
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
                                       max_new_tokens=n, generator=generator, return_dict_in_generate=True,
                                       return_history=show_steps, streamer=streamer, **sampling)
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
    return results


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
