"""An lm-evaluation-harness backend for dlm-adapt checkpoints: `--model dlm-adapt`.

lm-eval has no plugin entry point for models: a backend exists once the module defining it is imported. Importing
this module registers `dlm-adapt` (and `dlm_adapt`); `python -m adapt.evaluation.lm_eval_backend run --model dlm-adapt ...`
is lm-eval's own command line with it registered, and `lm_eval.simple_evaluate(model="dlm-adapt", ...)` works
after `import adapt.evaluation.lm_eval_backend`. `dlm-adapt eval MODEL --tasks ...` runs it through lm-eval's Python API.

- `loglikelihood`: the Monte-Carlo ELBO of the continuation with the context clean and never masked
  (`adapt.likelihood.elbo_draws`: stratified mask counts, seeded, batched across requests), block-wise for a
  block-diffusion checkpoint (exact at block size 1). `is_greedy`: every continuation token is the argmax at its
  position when it alone is masked. With `is_causal=True` the checkpoint is scored as its causal self (one
  forward, decoder's causal mask): the exact AR likelihood, the sanity baseline that equals lm-eval's `hf` on the
  source model.
- `loglikelihood_rolling`: the same over lm-eval's rolling windows of the document; each window is at most
  `max_length` tokens with its first as context, so every document token is scored once, as in `dlm-adapt eval`.
- `generate_until`: `diffusion_generate` on left-padded batches, cut at EOS, then at the first stop string.

Requests are scored in fixed groups of `GROUP` (longest first), so a request's draws depend on the seed and on the
requests run with it, never on `batch_size`: the same task, limit and seed give the same numbers run to run.
"""

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import torch

try:
    # lm-eval's own backends first: get_model registers them only into an empty registry, so `hf` would vanish
    importlib.import_module("lm_eval.models")
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the eval extra is not installed
    from ..errors import AdaptError

    raise AdaptError(f"the lm-eval backend needs lm-eval ({e}): pip install 'dlm-adapt[eval]'") from None

from ..training.batch import Batch
from ..checkpoint import CAUSAL, check_device, detect, is_diffusion_model, load
from ..config.commands import LmEvalModelArgs
from ..config.parsing import from_dict
from ..errors import AdaptError
from ..model.block_masked_diffusion import check_block_options, resolve_block_size
from ..model.configuration_masked_diffusion import SHIFT_DEFAULT
from ..training.likelihood import elbo_draws, model_device, token_scores
from ..sampling import SamplingError

NAME = "dlm-adapt"
GROUP = 64  # requests per ELBO call: a fixed number, so that batch_size cannot change the draws
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


class DLMAdaptLM(TemplateLM):
    """`--model dlm-adapt --model_args pretrained=DIR,...`; the model args are this constructor's keywords (see the
    README's table). `pretrained` may also be a loaded `MaskedDiffusionLM` (then pass `tokenizer`)."""

    def __init__(self, pretrained=None, tokenizer=None, **model_args):
        super().__init__()
        args = from_dict(LmEvalModelArgs, dict(model_args, pretrained=pretrained, tokenizer=tokenizer),
                         what="model arg", text=True)
        pretrained, tokenizer, device, dtype = args.pretrained, args.tokenizer, args.device, args.dtype
        self.batch_size_rows, self.mc_samples, self.seed = args.batch_size, args.mc_samples, args.seed
        self.block_size, self.is_causal, self._max_length = args.block_size, args.is_causal, args.max_length
        self.sampling = args.sampling()
        if device is not None:  # lm-eval's command line defaults to cuda:0
            check_device(device, "device")
        if isinstance(pretrained, (str, Path)):
            found = detect(pretrained)
            if found.kind == CAUSAL:
                raise AdaptError(f"{pretrained} is a causal LM, not a dlm-adapt checkpoint: score it with --model hf, "
                                 f"or convert it first (dlm-adapt convert {pretrained} OUTPUT)")
            self.model, self.tokenizer = load(pretrained, dtype=None if dtype in (None, "auto") else dtype,
                                              device=device)
            self.name = str(pretrained)
        else:
            if not is_diffusion_model(pretrained):
                raise AdaptError(f"pretrained is a {type(pretrained).__name__}, not a dlm-adapt diffusion model: score "
                                 "it with lm-eval's hf backend, or convert it first")
            if tokenizer is None:
                raise AdaptError("pass the tokenizer with a loaded model")
            self.model, self.tokenizer, self.name = pretrained.eval(), tokenizer, type(pretrained).__name__
            if device is not None:
                self.model.to(device)
        config = self.model.config
        if self.is_causal and not getattr(config, "shift", SHIFT_DEFAULT):
            raise AdaptError("is_causal=True needs a checkpoint converted with shift (logit i−1 predicts token i); "
                             "this one has shift=False, so it cannot give causal loglikelihoods: drop is_causal")
        if self.is_causal and self.block_size is not None:
            raise AdaptError("is_causal=True scores causally; block_size applies to the ELBO: give one of them")
        try:
            check_block_options(resolve_block_size(config), block_length=args.block_length, kv_cache=args.kv_cache)
        except SamplingError as e:
            raise AdaptError(str(e)) from None
        self._device = model_device(self.model)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval hands its own `batch_size`, `max_batch_size` and `device` beside the model args, and its command
        line always sets `batch_size` (1 unless `--batch_size` is given): lm-eval's `LM` would pass a model arg of
        the same name twice. A model arg, the more specific of the two, wins."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------------------------ lm-eval's interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # as lm-eval's hf backend: BOS when there is one, so empty contexts condition alike
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        text = self.model.config.text_config
        return getattr(text, "max_position_embeddings", None) or 2048

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as the hf backend, so both see the same tokens: the tokenizer's default unless the text starts with BOS
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            add_special_tokens = False
        return self.tokenizer.encode(string, **({} if add_special_tokens is None
                                                else {"add_special_tokens": add_special_tokens}))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise AdaptError("--apply_chat_template: this checkpoint's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model": self.name, "mc_samples": self.mc_samples, "seed": self.seed, "is_causal": self.is_causal,
                "block_size": self.block_size or getattr(self.model.config, "block_size", None)}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); the context is cut from the left
        to fit `max_length`, and at least one context token always stays."""
        items = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length - 1:
                raise AdaptError(f"a continuation of {len(continuation)} tokens does not fit max_length "
                                 f"{self.max_length} with a token of context; raise max_length")
            if not continuation:
                raise AdaptError("a request has an empty continuation: nothing to score")
            items.append(((context + continuation)[-self.max_length:], len(continuation)))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results = [None] * len(items)
        for lo in range(0, len(order), GROUP):
            group = order[lo:lo + GROUP]
            for i, value in zip(group, self._score([items[i] for i in group])):
                results[i] = value
                self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
        return results

    def _padded(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask) of token lists padded to the longest: on the right, real tokens keep positions
        0.. as alone; on the left, every row ends in the same column, where new tokens start."""
        width = max(len(tokens) for tokens in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, tokens in enumerate(rows):
            cols = slice(width - len(tokens), width) if left else slice(0, len(tokens))
            ids[row, cols] = torch.tensor(tokens)
            attention[row, cols] = 1
        return ids, attention

    def _score(self, items) -> list[tuple[float, bool]]:
        ids, attention = self._padded([tokens for tokens, _ in items], left=False)
        maskable = torch.zeros_like(ids, dtype=torch.bool)
        for row, (tokens, n) in enumerate(items):
            maskable[row, len(tokens) - n:len(tokens)] = True
        batch = Batch(ids, maskable, None if bool(attention.all()) else attention)
        try:
            if self.is_causal:
                logp, greedy = token_scores(self.model, batch, causal=True, batch_size=self.batch_size_rows)
            else:
                values, scored, _ = elbo_draws(self.model, batch, mc_samples=self.mc_samples,
                                               batch_size=self.batch_size_rows, seed=self.seed,
                                               block_size=self.block_size)
                logp = -(values.mean(1) * scored.double())
                _, greedy = token_scores(self.model, batch, block_size=self.block_size, batch_size=self.batch_size_rows)
        except ValueError as e:  # e.g. flash attention on a block-diffusion checkpoint
            raise AdaptError(str(e).splitlines()[0]) from e
        return [(float(lp), bool(g)) for lp, g in zip(logp.tolist(), greedy.tolist())]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            # windows of at most max_length tokens in all (the ELBO sees the scored token itself, unlike a causal
            # forward): max_seq_len = max_length − 1 scored tokens after one token of context
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append(((None, None), context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows) if windows else []):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.is_causal:
            raise AdaptError("is_causal=True scores loglikelihoods only; generation uses the diffusion sampler: run "
                             "generate_until tasks without is_causal")
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [None] * len(requests)
        for members in groups.values():
            options = dict(requests[members[0]].args[1])
            for lo in range(0, len(members), self.batch_size_rows):
                chunk = members[lo:lo + self.batch_size_rows]
                for i, text in zip(chunk, self._generate([requests[i].args[0] for i in chunk], options)):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, contexts: list[str], options: dict) -> list[str]:
        odd = sorted(set(options) - set(GEN_KWARGS))
        if odd:
            raise AdaptError(f"generation kwargs {', '.join(odd)} are not supported by dlm-adapt; use "
                             f"{', '.join(GEN_KWARGS)}")
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        wanted = int(options.get("max_gen_toks", self.max_gen_toks))
        temperature = float(options.get("temperature", 0.0) or 0.0) if options.get("do_sample", False) else 0.0
        n, block_length = wanted, self.sampling.block_length
        if block_length:  # whole blocks are decoded; the tokens past max_gen_toks are dropped
            n = math.ceil(wanted / block_length) * block_length
        steps = self.sampling.steps or n
        blocks = n // block_length if block_length else 1
        steps = math.ceil(steps / blocks) * blocks
        if n >= self.max_length:
            raise AdaptError(f"max_gen_toks {n} leaves no room for a prompt in max_length {self.max_length}; lower "
                             "max_gen_toks (--gen_kwargs max_gen_toks=N)")
        prompts = [self.tok_encode(c)[-(self.max_length - n):] for c in contexts]
        if any(not p for p in prompts):
            prompts = [p or [self.prefix_token_id] for p in prompts]  # shift needs a token before the first new one
        ids, attention = self._padded(prompts, left=True)
        width = ids.shape[1]
        device = self._device
        sampling = dataclasses.replace(self.sampling, max_new_tokens=n, steps=steps, temperature=temperature,
                                       **({"top_k": options.get("top_k"), "top_p": options.get("top_p")}
                                          if temperature > 0 else {}))
        generator = torch.Generator(device=device).manual_seed(self.seed) if temperature > 0 else None
        try:
            out = self.model.diffusion_generate(ids.to(device), attention_mask=attention.to(device),
                                                generator=generator, **sampling.kwargs())
        except SamplingError as e:
            raise AdaptError(str(e)) from e
        texts = []
        for row in out[:, width:width + wanted].tolist():
            if self.eot_token_id in row:
                row = row[:row.index(self.eot_token_id)]
            text = self.tok_decode(row)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def main(argv=None) -> int:
    """`python -m adapt.evaluation.lm_eval_backend ...`: lm-eval's command line (`run`, `ls`, `validate`) with `dlm-adapt`
    registered; an AdaptError is one line, as in `dlm-adapt`."""
    import os

    from lm_eval.__main__ import cli_evaluate

    # lm-eval logs every step at INFO by default; its results table is on stdout, and an error of ours should be
    # the one line on stderr. LMEVAL_LOG_LEVEL=INFO brings the log back
    os.environ.setdefault("LMEVAL_LOG_LEVEL", "WARNING")
    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except AdaptError as e:
        print(f"dlm-adapt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # run as a script, this copy stays unregistered: the imported module registers once
    from adapt.evaluation.lm_eval_backend import main as registered_main

    sys.exit(registered_main())
else:
    register_model(NAME, "dlm_adapt")(DLMAdaptLM)
