# Written into every converted checkpoint as remote code: imports only torch and transformers, so
# `AutoModel.from_pretrained(path, trust_remote_code=True)` works without dlm-adapt installed.
import contextlib
import functools
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .block_masked_diffusion import (BlockCacheDenoiser, block_attention_mask, block_diffusion_sample, cached_block_mask,
                                     check_block_options, clean_attention_of, position_ids_from_padding,
                                     resolve_block_size)
from .configuration_masked_diffusion import MaskedDiffusionConfig
from .sampling_masked_diffusion import Denoiser, SamplingError, _holes, check_sampling_options, diffusion_sample
from .drafter_masked_diffusion import DrafterAdapter
from .speculative_masked_diffusion import speculative_sample
from .transformers_compat import (attention_support_flags, cache_kwarg, decoder_class, drop_last_cached,
                                  explain_newer_transformers, output_cache, select_cache_positions, set_causal)


# Every auto class resolves to the diffusion model: a checkpoint must never load as an ordinary causal LM.
AUTO_MAP = {
    "AutoConfig": "configuration_masked_diffusion.MaskedDiffusionConfig",
    "AutoModel": "modeling_masked_diffusion.MaskedDiffusionLM",
    "AutoModelForCausalLM": "modeling_masked_diffusion.MaskedDiffusionLM",
    "AutoModelForMaskedLM": "modeling_masked_diffusion.MaskedDiffusionLM",
}
CODE_FILES = (
    "block_masked_diffusion.py",
    "configuration_masked_diffusion.py",
    "drafter_masked_diffusion.py",
    "modeling_masked_diffusion.py",
    "sampling_masked_diffusion.py",
    "speculative_masked_diffusion.py",
    "transformers_compat.py",
)


def remote_code_fields() -> dict:
    """The config.json fields that make transformers run the checkpoint's own code."""
    return {"auto_map": dict(AUTO_MAP), "architectures": ["MaskedDiffusionLM"]}


def write_remote_code(config, save_directory, save) -> None:
    """The one writer of a checkpoint's remote code, for `convert`, `save_pretrained` (so training) alike: stamps
    `config` with `remote_code_fields`, calls `save(save_directory)` (which writes config.json), then copies
    `CODE_FILES` beside it from wherever this file was loaded (the package, or a remote-code module cache)."""
    for key, value in remote_code_fields().items():
        setattr(config, key, value)
    save(save_directory)
    here, there = Path(__file__).resolve().parent, Path(save_directory).resolve()
    if here != there:
        for name in CODE_FILES:
            shutil.copyfile(here / name, there / name)


class MaskedDiffusionLM(PreTrainedModel):
    """A causal decoder turned into a masked diffusion denoiser.

    The original causal LM lives unchanged in `self.decoder`; only its attention is made bidirectional, through
    transformers' own `config.is_causal` switch (mask builders) and each attention module's `is_causal` flag
    (which SDPA/flash kernels read when no mask tensor is built). This is not an autoregressive model:
    `generate()` refuses, use `diffusion_generate()`.
    """

    config_class = MaskedDiffusionConfig
    base_model_prefix = "decoder"
    supports_gradient_checkpointing = True

    def __init__(self, config: MaskedDiffusionConfig):
        with explain_newer_transformers():
            self._build(config)

    def _build(self, config: MaskedDiffusionConfig):
        super().__init__(config)
        self.decoder = AutoModelForCausalLM.from_config(config.text_config)
        # one config object, so `config.text_config` and what the decoder reads never disagree
        self.config.text_config = self.decoder.config
        self._no_split_modules = getattr(self.decoder, "_no_split_modules", None)
        self.generation_config = GenerationConfig()
        if getattr(config, "drafter", None):  # speculative decoding's drafter, beside the untouched parent
            self.drafter = DrafterAdapter(self.decoder, config.drafter, config.mask_token_id)
        self.post_init()
        self._set_causal(not config.bidirectional)

    def _init_weights(self, module):
        self.decoder._init_weights(module)

    def get_input_embeddings(self):
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.decoder.set_output_embeddings(value)

    def _set_causal(self, causal: bool):
        set_causal(self.decoder, causal)

    @contextlib.contextmanager
    def _attention(self, causal: bool):
        default = not self.config.bidirectional
        if causal == default:
            yield
            return
        self._set_causal(causal)
        try:
            yield
        finally:
            self._set_causal(default)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        is_causal: bool = False,
        past_key_values=None,
        use_cache: bool = False,
        **kwargs,
    ):
        """Logits for every position. `attention_mask` is the 2-D padding mask (1 = real token).

        `is_causal=True` runs the decoder with its original causal mask (annealing ratio 0): the converted model
        then reproduces the source causal LM exactly. Otherwise a block-diffusion checkpoint (`config.block_size`)
        attends block-causally (see `block_masked_diffusion`); a prebuilt 4-D mask is used as given. The output is
        the decoder's own (transformers' causal-LM output class of the installed release), with its KV cache only
        when `use_cache=True`. The cache goes in as `cache=` or `past_key_values=`, whichever the caller's
        transformers uses.
        """
        cache = kwargs.pop("cache", None)
        cache = cache if cache is not None else past_key_values
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # padding must not move real tokens' positions, or padded and unpadded inputs would differ
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = position_ids_from_padding(attention_mask)[:, -length:]
        if kwargs.get("labels") is not None:
            # the decoder would compute a causal next-token loss, which is not the diffusion objective
            raise TypeError("MaskedDiffusionLM.forward takes no labels: compute the masked-diffusion loss from logits")
        block_size = getattr(self.config, "block_size", None)
        if block_size is not None and not is_causal and (attention_mask is None or (
                isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)):  # else prebuilt: used as given
            embeds = input_ids if input_ids is not None else inputs_embeds
            past = cache.get_seq_length() if cache is not None else 0
            padding = attention_mask if attention_mask is not None else torch.ones(
                (embeds.shape[0], past + embeds.shape[1]), dtype=torch.long, device=embeds.device)
            if position_ids is None:
                position_ids = torch.arange(past, past + embeds.shape[1], device=embeds.device).unsqueeze(0)
            with explain_newer_transformers():
                # with a cache (block decoding) the mask spans cached keys + queries (`padding` covers both)
                attention_mask = (cached_block_mask(self.config.text_config, padding, position_ids, block_size,
                                                    self.dtype, clean_attention_of(self.config))
                                  if cache is not None else block_attention_mask(
                                      self.config.text_config, padding, position_ids, block_size, self.dtype))
        with explain_newer_transformers(), self._attention(is_causal or not self.config.bidirectional):
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{cache_kwarg(type(self.decoder).forward): cache},
                **kwargs,
            )
        return out

    def generate(self, *args, **kwargs):
        raise TypeError(
            "MaskedDiffusionLM is a masked diffusion model, not an autoregressive one: "
            "use model.diffusion_generate(input_ids, max_new_tokens=N, steps=S)"
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
        try:
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        except OSError:
            pass  # no generation_config.json: diffusion_generate uses its documented defaults
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves a checkpoint that loads with transformers alone: weights, config with `auto_map`, this file and
        its configuration file (copied from wherever this class was loaded), and the generation config."""
        write_remote_code(self.config, save_directory,
                          lambda directory: super(MaskedDiffusionLM, self).save_pretrained(directory, *args, **kwargs))
        if self.generation_config is not None:
            self.generation_config.save_pretrained(save_directory)

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: str | None = None,
        threshold: float | None = None,
        entropy_bound: float | None = None,
        sub_block: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_at_eos: bool = True,
        min_new_tokens: int = 0,
        schedule: str = "linear",
        order_temperature: float = 0.0,
        generator: torch.Generator | None = None,
        return_dict_in_generate: bool = False,
        return_history: bool = False,
        kv_cache: str | None = None,
        streamer=None,
        speculative: bool = False,
        draft_length: int | None = None,
        guess_bonus: bool | None = None,
    ):
        """Decode `max_new_tokens` tokens after each prompt by iterative unmasking (see `diffusion_sample`).

        Left-pad batched prompts and pass `attention_mask`; mask tokens inside a prompt are holes to infill.
        When `max_new_tokens` is not given, it, `steps` and `block_length` come from `generation_config.json`;
        otherwise `steps` defaults to `max_new_tokens` and `block_length` to `max_new_tokens` (one block). With
        `max_new_tokens=0` (infilling only) `steps` defaults to the most holes in a row. `remasking` defaults to
        the generation config's, else `low_confidence`.
        `kv_cache` (Fast-dLLM's approximation, off by default): keys/values are computed once per block and reused
        by the block's later passes, which then run only the block and what follows it (`"prefix"`) or only the
        block (`"dual"`). With bidirectional attention the reused entries go stale as the block fills in.
        `entropy_bound` (gamma > 0): the EB-sampler's commit rule instead of the schedule or `threshold`.
        A block-diffusion checkpoint (`config.block_size`) decodes its own blocks with an exact KV cache
        (`block_diffusion_sample`); there `sub_block` commits each block's tokens that many at a time, left to right
        (Fast-dLLM v2), and generation ends at the block where every row's EOS is committed.
        `streamer` (e.g. transformers' `TextStreamer` / `TextIteratorStreamer`; one prompt) receives the prompt,
        then each block's new tokens as soon as they are final, up to EOS; a list of streamers streams every row
        to its own (None: not that row), and a row whose streamer's `cancelled` turns true stops (`Stream`).
        `speculative=True` (a drafter checkpoint; any other is refused): one forward per round, in which
        the causal parent verifies the last `draft_length` drafts (default: the block size) and the drafter drafts
        the next ones, so the output is the parent's own: greedy, token for token its `generate(do_sample=False)`;
        with a temperature, distributed exactly as its sampling with the same temperature, top_k and top_p
        (`speculative_sample`). Off by default, also for a drafter checkpoint. Returns a `SpeculativeOutput` with
        `return_dict_in_generate=True` (adds per-row `.row_rounds` and `.acceptance` per draft position).
        `guess_bonus` (default on): also guess the parent's token where it may reject a draft, which commits one
        more token from the same forward when right (`speculative_sample`; `.row_guessed`).
        Returns a LongTensor (batch, prompt_len + max_new_tokens), or a `SamplingOutput` (`.sequences`, `.nfe`,
        `.committed_per_step`, `.history`, per-row `.row_nfe` and `.row_committed`) with
        `return_dict_in_generate=True`.
        """
        if speculative or draft_length is not None or guess_bonus is not None:
            return self._speculative_generate(
                input_ids, attention_mask, max_new_tokens, (draft_length, guess_bonus), speculative, temperature,
                top_k, top_p, stop_at_eos, min_new_tokens, generator, return_dict_in_generate, streamer,
                dict(steps=steps, block_length=block_length, remasking=remasking, threshold=threshold,
                     entropy_bound=entropy_bound, sub_block=sub_block, kv_cache=kv_cache,
                     order_temperature=order_temperature or None, return_history=return_history or None,
                     schedule=None if schedule == "linear" else schedule))
        block_size = resolve_block_size(self.config)
        check_sampling_options(kv_cache=kv_cache)  # the sampler checks the rest, once the defaults are resolved
        check_block_options(block_size, block_length=block_length, kv_cache=kv_cache, sub_block=sub_block)
        n, steps, block_length = _lengths(self, input_ids, attention_mask, max_new_tokens, steps, block_length)
        gen = self.generation_config
        out = _sampler(self, block_size, kv_cache, sub_block, block_length)(
            input_ids, attention_mask=attention_mask, mask_token_id=self.config.mask_token_id,
            shift=self.config.shift, max_new_tokens=n, steps=steps,
            remasking=remasking or getattr(gen, "remasking", None) or "low_confidence", schedule=schedule,
            threshold=threshold, entropy_bound=entropy_bound, temperature=temperature,
            order_temperature=order_temperature, top_k=top_k, top_p=top_p,
            eos_token_id=_first(getattr(gen, "eos_token_id", None)) if stop_at_eos else None,
            min_new_tokens=min_new_tokens,
            max_positions=getattr(self.config.text_config, "max_position_embeddings", None),
            generator=generator, return_history=return_history, streamer=streamer)
        return out if return_dict_in_generate else out.sequences

    def _speculative_generate(self, input_ids, attention_mask, max_new_tokens, drafting, speculative,
                              temperature, top_k, top_p, stop_at_eos, min_new_tokens, generator,
                              return_dict_in_generate, streamer, diffusion_only):
        draft_length, guess_bonus = drafting
        if not speculative:
            name = "draft_length (--draft-length)" if draft_length is not None else "guess_bonus"
            raise SamplingError(f"{name} is the speculative drafter's: pass speculative=True (--speculative)")
        unused = [name for name, value in diffusion_only.items() if value is not None]
        if unused:
            raise SamplingError(f"speculative decoding drafts and verifies, it has no diffusion steps: leave "
                                f"{', '.join(unused)} unset")
        check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               min_new_tokens=min_new_tokens)
        gen = self.generation_config
        n = int(getattr(gen, "max_new_tokens", None) or 128) if max_new_tokens is None else int(max_new_tokens)
        out = speculative_sample(
            self, input_ids, max_new_tokens=n, draft_length=draft_length, attention_mask=attention_mask,
            temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=_first(getattr(gen, "eos_token_id", None)) if stop_at_eos else None,
            min_new_tokens=min_new_tokens, max_positions=getattr(self.config.text_config, "max_position_embeddings",
                                                                 None),
            generator=generator, streamer=streamer, guess_bonus=guess_bonus is not False)
        return out if return_dict_in_generate else out.sequences

    def supports_kv_cache(self) -> bool:
        text = self.config.text_config
        layer_types = getattr(text, "layer_types", None)
        if layer_types:
            return all(t == "full_attention" for t in layer_types)
        return getattr(text, "sliding_window", None) is None or getattr(text, "use_sliding_window", True) is False


# Attention support is the decoder's: transformers asks before the decoder exists, so each flag looks up its class.
for _flag in attention_support_flags():
    setattr(MaskedDiffusionLM, _flag,
            property(lambda self, flag=_flag: bool(getattr(decoder_class(self.config.text_config), flag, False))))


class ModelDenoiser(Denoiser):
    """No cache: every pass runs the whole canvas, with the vocabulary projection only where it is needed."""

    def __init__(self, model):
        super().__init__(model.config.shift)
        self.model = model

    def logits(self, canvas, attention_mask, first, last):
        keep = torch.arange(first, last, device=canvas.device)
        return self.model(input_ids=canvas, attention_mask=attention_mask, logits_to_keep=keep).logits


class PrefixCacheDenoiser(ModelDenoiser):
    """Fast-dLLM's prefix cache. The first pass over a span runs the whole canvas and keeps the keys/values of
    everything outside the rerun window; later passes over that span run only the window, from the first logit
    they need to the end of the canvas, attending to the kept entries. Under causal attention those never go stale
    (exact); under bidirectional attention they do, as the span fills in."""

    def __init__(self, model):
        if not model.supports_kv_cache():
            raise SamplingError("kv_cache needs a decoder without sliding-window layers")
        super().__init__(model)
        self.span = self.window = self.cache = self.kept_mask = None  # set by the first pass over each span

    def window_end(self, hi: int, length: int) -> int:
        return length

    def logits(self, canvas, attention_mask, first, last):
        mask = attention_mask if attention_mask is not None else torch.ones_like(canvas)
        keep = torch.arange(first, last, device=canvas.device)
        length = canvas.shape[1]
        if self.span != (first, last):
            self.span = first, last
            out = self.model(input_ids=canvas, attention_mask=mask, use_cache=True, logits_to_keep=keep)
            # the window must hold every token that can change (up to hi) and every logit asked for (from first)
            self.window = (first, self.window_end(last + self.shift, length))
            kept = torch.cat([torch.arange(first), torch.arange(self.window[1], length)]).to(canvas.device)
            self.cache = output_cache(out)
            select_cache_positions(self.cache, kept)  # bidirectional attention ignores key order: window goes last
            self.kept_mask = mask[:, kept]
            return out.logits
        a, b = self.window
        positions = position_ids_from_padding(mask)[:, a:b]
        out = self.model(input_ids=canvas[:, a:b], attention_mask=torch.cat([self.kept_mask, mask[:, a:b]], 1),
                         position_ids=positions, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=keep - a)
        drop_last_cached(self.cache, b - a)
        return out.logits


class DualCacheDenoiser(PrefixCacheDenoiser):
    """Fast-dLLM's dual cache: later passes run only the span, the keys/values after it are kept too. They come
    before the window in the cache, which only bidirectional attention can ignore."""

    def __init__(self, model):
        super().__init__(model)
        if not model.config.bidirectional:
            raise SamplingError("kv_cache='dual' needs bidirectional attention (the stored keys are reordered)")

    def window_end(self, hi, length):
        return hi


DENOISERS = {None: ModelDenoiser, "prefix": PrefixCacheDenoiser, "dual": DualCacheDenoiser}  # by kv_cache


def _lengths(model, input_ids, attention_mask, max_new_tokens, steps, block_length):
    """max_new_tokens, steps and block_length: from generation_config.json when max_new_tokens is not given,
    else steps = max_new_tokens (infilling alone: the most holes in a row) and one block."""
    gen = model.generation_config
    from_config = max_new_tokens is None
    n = int(getattr(gen, "max_new_tokens", None) or 128) if from_config else int(max_new_tokens)
    if steps is None:  # infilling alone (no new tokens): one pass per hole, as one new token takes one pass
        holes = int(_holes(input_ids, model.config.mask_token_id, attention_mask).max()) if n == 0 else 0
        steps = int((getattr(gen, "steps", None) or n) if from_config else n) or max(1, holes)
    if block_length is None:
        block_length = int(getattr(gen, "block_length", None) or n) if from_config else n
    return n, steps, block_length


def _sampler(model, block_size, kv_cache, sub_block, block_length):
    """The decoding loop and its denoiser: a block-diffusion checkpoint decodes block by block with its exact
    cache (the full-sequence loop would let a block see later ones); else the semi-autoregressive loop with the
    `kv_cache` chosen (`DENOISERS`)."""
    if block_size is not None:
        return functools.partial(block_diffusion_sample, functools.partial(BlockCacheDenoiser, model),
                                 block_size=block_size, sub_block=sub_block)
    return functools.partial(diffusion_sample, DENOISERS[kv_cache](model), block_length=block_length)


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


__all__ = ["MaskedDiffusionLM"]
