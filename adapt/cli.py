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
    """`train` and `sft`: a recipe plus overrides, run by the same loop; `args.job` picks config class and entry."""
    from .config import SFTConfig, TrainConfig, load_config
    from .train import sft, train

    cls, run, done = {"train": (TrainConfig, train, "trained"), "sft": (SFTConfig, sft, "fine-tuned")}[args.job]
    final = run(load_config(args.recipe, args.overrides, cls=cls))
    print(f"{done} -> {final}" if final else "stopped (stop_after); continue with resume=true")


def _generate(args):
    import json

    from .generate import generate

    prompts = list(args.prompt or [])
    if args.prompts_file:
        from pathlib import Path

        if not Path(args.prompts_file).is_file():
            raise AdaptError(f"prompts file {args.prompts_file} not found")
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise AdaptError(f"prompts file {args.prompts_file} is not UTF-8 text (byte {e.start}); give one prompt "
                             "per line as text") from None
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if args.infill:
        prompts.append(args.infill)
    results = generate(args.model, prompts, chat=args.chat, infill=bool(args.infill),
                       max_new_tokens=args.max_new_tokens, steps=args.steps, block_length=args.block_length,
                       remasking=args.remasking, threshold=args.threshold, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, show_steps=args.show_steps,
                       min_new_tokens=args.min_new_tokens, kv_cache=args.kv_cache)
    for r in results:
        print(json.dumps(r) if args.json else r["text"])


def _upgrade(args):
    from .upgrade import upgrade

    result = upgrade(args.directory, check=args.check)
    print(result.report())
    return 1 if args.check and result.needed else 0


def _push(args):
    from .push import push_to_hub

    result = push_to_hub(args.directory, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, adapter_only=args.adapter_only, dry_run=args.dry_run)
    print(result.report())


def _eval(args):
    import json

    from .evaluate import check_writable, evaluate, write_json

    steps = None
    if args.sweep_steps:
        try:
            steps = [int(s) for s in args.sweep_steps.split(",") if s.strip()]
        except ValueError:
            raise AdaptError(f"--sweep-steps takes comma-separated integers, got {args.sweep_steps!r}") from None
    seq_length = 128 if args.seq_length is None else args.seq_length
    if args.block_length is not None:  # its old name, kept for one release
        if args.seq_length is not None:
            raise AdaptError("--block-length is the deprecated name of --seq-length; give only --seq-length")
        print("dlm-adapt: warning: --block-length is deprecated, use --seq-length", file=sys.stderr)
        seq_length = args.block_length
    if args.json:
        check_writable(args.json)  # before minutes of evaluation, not after
    result = evaluate(args.model, args.data, metrics=args.metrics, ar_parent=args.ar_parent,
                      mc_samples=args.mc_samples, seq_length=seq_length, num_blocks=args.num_blocks,
                      batch_size=args.batch_size, seed=args.seed, device=args.device, text_column=args.text_column,
                      sample_by=args.sample_by, split=args.split, hub_config=args.hub_config,
                      infill_span=args.infill_span, infill_examples=args.infill_examples,
                      sweep_length=args.sweep_length, sweep_steps=steps, sweep_examples=args.sweep_examples,
                      plot=args.plot, kv_cache=args.kv_cache)
    if args.json:
        write_json(result, args.json)
    print(json.dumps(result, indent=2))


def _add_eval_parser(sub):
    p = sub.add_parser("eval", help="likelihood, infilling and steps-sweep metrics on held-out text",
                       description="Evaluate a diffusion checkpoint (Monte-Carlo ELBO, infilling, quality against "
                                   "decoding steps) or a causal LM (exact NLL, left-context baseline) on the same "
                                   "packed blocks of text. Prints the result as JSON.")
    p.add_argument("model", help="a dlm-adapt checkpoint, a causal LM directory, a .gguf file, or a Hub id")
    p.add_argument("--data", required=True,
                   help="a .txt/.json/.jsonl/.parquet file (comma-separated for several) or a Hub dataset name")
    p.add_argument("--metrics", default="elbo", help="comma-separated: elbo, infill, steps_sweep (default: elbo)")
    p.add_argument("--mc-samples", type=int, default=16, help="Monte-Carlo draws per block for the ELBO (default: 16)")
    p.add_argument("--ar-parent", help="causal LM that scores generated text (default: the checkpoint's "
                                       "provenance.source, if it loads from local files)")
    p.add_argument("--seq-length", type=int, help="tokens per packed block (default: 128)")
    p.add_argument("--block-length", type=int, help="deprecated name of --seq-length")
    p.add_argument("--num-blocks", type=int, default=64, help="blocks evaluated, from the start of the data (default: 64)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: where the model loads)")
    p.add_argument("--text-column", default="text", help="text field of json/jsonl/parquet/Hub data (default: text)")
    p.add_argument("--sample-by", default="paragraph", choices=["line", "paragraph", "document"],
                   help="how a .txt file splits into documents (default: blank-line-separated paragraphs)")
    p.add_argument("--split", default="validation", help="Hub dataset split (default: validation)")
    p.add_argument("--hub-config", help="Hub dataset configuration name")
    p.add_argument("--infill-span", type=int, help="tokens hidden in the middle of each block (default: block/4)")
    p.add_argument("--infill-examples", type=int, default=16, help="blocks used for infilling (default: 16)")
    p.add_argument("--sweep-length", type=int, default=16, help="tokens generated in the steps sweep (default: 16)")
    p.add_argument("--sweep-steps", help="comma-separated step counts (default: 1, 2, 4, ... up to --sweep-length)")
    p.add_argument("--sweep-examples", type=int, default=32, help="task examples and prompts in the sweep (default: 32)")
    p.add_argument("--json", metavar="OUT.json", help="also write the result to this file")
    p.add_argument("--plot", metavar="OUT.png", help="plot the steps sweep (needs matplotlib: the eval extra)")
    p.add_argument("--kv-cache", choices=["prefix", "dual"],
                   help="a diffusion checkpoint's KV cache while it decodes for infill and steps_sweep (as in generate)")
    p.set_defaults(func=_eval)


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

    recipe_jobs = {
        "train": ("adapt a model with the masked-diffusion objective",
                  "Continued training with the masked-diffusion objective while annealing the attention mask; runs "
                  "under `accelerate launch` too. Writes OUTPUT/metrics.jsonl, OUTPUT/checkpoints/step-N and "
                  "OUTPUT/final.", "recipes/adaptation/", "train.lr=3e-4"),
        "sft": ("supervised fine-tuning on chat data (prompt never noised)",
                "SFT of a diffusion checkpoint (or a causal source, converted first) on conversations: only assistant "
                "tokens are noised and trained, answers are padded with EOS to a fixed canvas, one sample per row. "
                "Same outputs as `train`.", "recipes/sft/", "data.eos_padding=none"),
    }
    for job, (summary, description, recipes, example) in recipe_jobs.items():
        p = sub.add_parser(job, help=summary, description=description)
        p.add_argument("recipe", help=f"YAML recipe (see {recipes})")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help=f"dotted overrides, e.g. output_dir=runs/x max_steps=10 {example}")
        p.set_defaults(func=_train, job=job)

    p = sub.add_parser("generate", help="decode text from a diffusion checkpoint",
                       description="Iterative-unmasking decoding from a dlm-adapt checkpoint.")
    p.add_argument("model", help="a dlm-adapt checkpoint directory or Hub id")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; decoded as one left-padded batch)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--infill", metavar="TEXT", help="text whose mask-token strings (e.g. <|mask|>) are holes to fill")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens to generate (default: the checkpoint's generation_config.json, which decides --steps "
                        "and --block-length too; 128 for a fresh conversion)")
    p.add_argument("--steps", type=int,
                   help="forward passes (default: max-new-tokens when it is given, else generation_config.json)")
    p.add_argument("--block-length", type=int,
                   help="semi-autoregressive block length (default: one block when --max-new-tokens is given, else "
                        "generation_config.json)")
    p.add_argument("--remasking", choices=["low_confidence", "margin", "entropy", "random"],  # the sampler's SCORES
                   help="which masked positions to commit first (default: generation_config.json, else low_confidence)")
    p.add_argument("--threshold", type=float, help="parallel decoding: commit every position with p >= threshold")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-new-tokens", type=int, default=0, help="forbid EOS before this many new tokens")
    p.add_argument("--seed", type=int)
    p.add_argument("--kv-cache", choices=["prefix", "dual"],
                   help="Fast-dLLM's approximate KV cache, refreshed once per block: later passes rerun the block and "
                        "what follows it (prefix) or only the block (dual)")
    p.add_argument("--show-steps", action="store_true", help="print the canvas after every step (stderr)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt: text, tokens, nfe, ...")
    p.set_defaults(func=_generate)

    p = sub.add_parser("push", help="upload a checkpoint or adapter to the Hugging Face Hub with a model card",
                       description="Validate DIR (a dlm-adapt checkpoint, or a PEFT adapter of one), generate its "
                                   "model card, and upload everything in one commit. The token comes from HF_TOKEN "
                                   "or `hf auth login`; DIR is never modified.")
    p.add_argument("directory", metavar="DIR", help="checkpoint directory (e.g. OUTPUT/final) or PEFT adapter")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, namespace/name; created if missing")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if missing (default: main)")
    p.add_argument("--commit-message", metavar="M", help="commit message")
    p.add_argument("--adapter-only", action="store_true",
                   help="DIR must be a PEFT adapter: upload only adapter_config.json and adapter_model.safetensors "
                        "(and the card)")
    p.add_argument("--dry-run", action="store_true", help="print the files and the card; contact nothing")
    p.set_defaults(func=_push)
    _add_eval_parser(sub)

    p = sub.add_parser("upgrade", help="update an older dlm-adapt checkpoint's remote code to this release",
                       description="Rewrite the remote-code files and outdated config fields of a checkpoint written "
                                   "by an earlier dlm-adapt (e.g. one that fails with transformers alone after a "
                                   "transformers upgrade), in place; each file is replaced atomically and weight "
                                   "files stay byte-identical. Works on convert outputs, OUTPUT/final and "
                                   "OUTPUT/checkpoints/step-N. Push the directory again to update a Hub repo.")
    p.add_argument("directory", metavar="DIR", help="a dlm-adapt checkpoint directory")
    p.add_argument("--check", action="store_true",
                   help="only report whether an upgrade is needed (exit 1 if so); write nothing")
    p.set_defaults(func=_upgrade)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except AdaptError as e:
        print(f"dlm-adapt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # temporary outputs were removed on the way out (finally blocks); 130 = 128 + SIGINT
        print(f"dlm-adapt: error: interrupted (Ctrl-C); {args.command} stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
