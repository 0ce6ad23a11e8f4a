"""Supervised fine-tuning of a masked diffusion LM on chat data — the script behind `dlm-adapt sft`.

    python recipes/sft.py recipes/sft/stories260k-tiny.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/sft.py recipes/sft/llama-3.1-8b-lora-fsdp.yaml
    dlm-adapt sft RECIPE.yaml [key=value ...]                      # the same function

What it does (LLaDA's SFT guideline, REFERENCE §6), all configured in the YAML (fields: adapt/config/recipes.py):
- data: conversations (`messages`, multi-turn), prompt/completion pairs or instruction/input/output records, from
  local json/jsonl/parquet or a Hub dataset, rendered with the tokenizer's chat template (or
  `data.chat_template: default`); `data.train_on` trains every assistant turn or only the last;
- the prompt is never noised: only assistant tokens are maskable and carry loss;
- every answer is padded with EOS to a fixed canvas (`data.max_length`); `data.eos_padding` says whether the
  padding is noised and trained (LLaDA), kept clean, or replaced by attention-masked padding;
- one sample per row, so no attention crosses samples; over-long samples are an error or dropped with a count,
  never cut;
- loss normalisation `objective.normalization`: `sequence` (per answer length, LLaDA SFT, the default), `masked`
  or `all`; 1/t or CART weighting;
- full, LoRA or QLoRA (`train.method`), annealing if the source is still causal (`anneal.*`), exact resume,
  validation ELBO on held-out answers, samples during training, the result in OUTPUT/final.
"""

import sys

from adapt import SFTConfig, load_config, sft
from adapt.errors import AdaptError


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    try:
        final = sft(load_config(argv[0], argv[1:], cls=SFTConfig))
    except AdaptError as e:
        print(f"sft: error: {e}", file=sys.stderr)
        return 2
    print(f"fine-tuned -> {final}" if final else "stopped (stop_after); continue with resume=true")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
