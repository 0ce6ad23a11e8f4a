"""`dlm-adapt` command line. Each subcommand calls the same function as the Python API."""

import argparse
import sys

from .errors import AdaptError


def _convert(args):
    from .convert import convert

    out = convert(
        args.source,
        args.output,
        mask_token=args.mask_token,
        shift=args.shift,
        dtype=args.dtype,
        revision=args.revision,
        gguf_file=args.gguf_file,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
    )
    print(f"converted {args.source} -> {out}")


def _train(args):
    from .config import load_config
    from .train import train

    final = train(load_config(args.recipe, args.overrides))
    print(f"trained -> {final}" if final else "stopped (stop_after); continue with resume=true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm-adapt", description="Turn causal LMs into masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a causal checkpoint into a diffusion checkpoint",
                       description="Convert a causal LM (local directory, .gguf file or Hub id) into a masked "
                                   "diffusion checkpoint that loads with transformers alone (trust_remote_code).")
    p.add_argument("source", help="local model directory, .gguf file, or Hugging Face Hub model id")
    p.add_argument("output", help="directory to create")
    p.add_argument("--mask-token", default="auto",
                   help="'auto' (default: existing mask token, else a spare embedding row, else add <|mask|>), "
                        "a token in the vocabulary, or a token id")
    p.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the AR alignment: logit i-1 predicts token i (default: on)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype of the output (default: same as the source)")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--gguf-file", help="GGUF file name inside SOURCE (a directory or Hub repo)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the source's own Python code for its config/tokenizer (off by default)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_convert)

    p = sub.add_parser("train", help="adapt a model with the masked-diffusion objective",
                       description="Continued training with the masked-diffusion objective while annealing the "
                                   "attention mask; runs under `accelerate launch` too. Writes OUTPUT/metrics.jsonl, "
                                   "OUTPUT/checkpoints/step-N and OUTPUT/final.")
    p.add_argument("recipe", help="YAML recipe (see recipes/adapt/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. output_dir=runs/x max_steps=10 train.lr=3e-4")
    p.set_defaults(func=_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except AdaptError as e:
        print(f"dlm-adapt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
