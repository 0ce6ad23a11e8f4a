"""`dlm-adapt` command line. Each subcommand calls the same function as the Python API."""

import argparse
import dataclasses
import sys
from pathlib import Path

from transformers import HfArgumentParser

from .config import ConvertOptions, EvalOptions, GenerateOptions, PushOptions, ServeOptions, UpgradeOptions
from .errors import AdaptError


def _convert(args):
    from .conversion.convert import convert

    out = convert(args.source, args.output, **_options(args, ConvertOptions))
    print(f"converted {args.source} -> {out}")


def _train(args):
    """`train` and `sft`: a recipe plus overrides, run by the same loop; `args.job` picks config class and entry."""
    from .config import SFTConfig, TrainConfig, load_config
    from .training.recipe import sft, train

    cls, run, done = {"train": (TrainConfig, train, "trained"), "sft": (SFTConfig, sft, "fine-tuned")}[args.job]
    final = run(load_config(args.recipe, args.overrides, cls=cls))
    print(f"{done} -> {final}" if final else "stopped (stop_after); continue with resume=true")


def _generate(args):
    import json

    from .sampling.generate import generate

    o = GenerateOptions(**_options(args, GenerateOptions))
    prompts = list(o.prompt)
    if o.prompts_file:
        if not Path(o.prompts_file).is_file():
            raise AdaptError(f"prompts file {o.prompts_file} not found")
        try:
            text = Path(o.prompts_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise AdaptError(f"prompts file {o.prompts_file} is not UTF-8 text (byte {e.start}); give one prompt "
                             "per line as text") from None
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if o.infill:
        prompts.append(o.infill)
    options = dict(chat=o.chat, infill=bool(o.infill), seed=o.seed, show_steps=o.show_steps, sampling=o.sampling())
    if o.stream:
        if o.json or o.infill:
            raise AdaptError(f"--stream prints text as it is decoded: it cannot be combined with "
                             f"{'--json' if o.json else '--infill'}")
        from transformers import TextStreamer

        from .checkpoint import load
        from .sampling.generate import check_options

        for prompt in prompts:
            check_options(args.model, [prompt], o.sampling(), streaming=True)  # before the weights load
        model, tokenizer = load(args.model)
        for prompt in prompts:  # one at a time: a streamer takes one row
            generate(model, [prompt], tokenizer=tokenizer, streamer=TextStreamer(
                tokenizer, skip_prompt=True, skip_special_tokens=True), **options)
        return
    results = generate(args.model, prompts, **options)
    for r in results:
        print(json.dumps(r) if o.json else r["text"])


def _serve(args):
    import logging

    from .serving.app import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    serve(args.model, **_options(args, ServeOptions))


def _upgrade(args):
    from .hub.upgrade import upgrade

    result = upgrade(args.directory, **_options(args, UpgradeOptions))
    print(result.report())
    return 1 if args.check and result.needed else 0


def _push(args):
    from .hub.push import push_to_hub

    print(push_to_hub(args.directory, args.repo_id, **_options(args, PushOptions)).report())


def _eval(args):
    import json

    from .evaluation.harness import evaluate

    options = EvalOptions(**_options(args, EvalOptions))  # checked, and defaults resolved, before anything loads
    print(json.dumps(evaluate(args.model, **dataclasses.asdict(options)), indent=2))


def _options(args, cls) -> dict:
    """The parsed flags that are fields of `cls`, as keywords for the job's Python function."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def _switches(parser, options):
    """HfArgumentParser declares a bool field as `--flag [BOOL]`, which swallows a positional that follows it
    (`upgrade --check DIR`). Each is declared again as a plain switch; `conflict_handler="resolve"` drops the
    first declaration. `--no-flag` for a field that defaults to True stays as HfArgumentParser made it."""
    for f in dataclasses.fields(options) if options else ():
        if f.type is bool:
            names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
            parser.add_argument(*names, dest=f.name, action="store_true", default=f.default, help=f.metadata["help"])
            if f.default:
                negated = dict.fromkeys([f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"])
                parser.add_argument(*negated, dest=f.name, action="store_false", help=f"turn {list(names)[-1]} off")


class _OneLineErrors:
    """A flag argparse cannot parse is one `dlm-adapt: error:` line pointing at --help, like every other bad
    input, instead of the usage block followed by the error."""

    def error(self, message):
        command = self.prog.removeprefix("dlm-adapt").strip()
        self.exit(2, f"dlm-adapt: error: {message}; see dlm-adapt {command + ' ' if command else ''}--help\n")


class _Parser(_OneLineErrors, argparse.ArgumentParser):
    pass


class _CommandParser(_OneLineErrors, HfArgumentParser):
    pass


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a field's default unless it is unset (None, False, empty) or the help already says it."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in (action.help or ""):
            return action.help
        if isinstance(action.default, tuple):  # Names/Ints: shown as typed, comma-separated
            return f"{action.help} (default: {','.join(map(str, action.default))})"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per job. Flags and their help come from the job's options dataclass (`adapt.config`);
    only positional arguments, which are the Python functions' own, are declared here."""
    parser = _Parser(prog="dlm-adapt", description="Turn causal LMs into masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    def command(name, options, func, summary, description, *positionals):
        p = sub.add_parser(name, dataclass_types=[options] if options else [], help=summary, description=description,
                           formatter_class=_HelpFormatter, conflict_handler="resolve")
        _switches(p, options)
        for dest, text, *nargs in positionals:
            p.add_argument(dest, help=text, **({"nargs": nargs[0]} if nargs else {}),
                           **({"metavar": dest.upper()} if dest in ("directory", "repo_id") else {}))
        p.set_defaults(func=func)
        return p

    command("convert", ConvertOptions, _convert, "convert a causal checkpoint into a diffusion checkpoint",
            "Convert a causal LM (local directory, .gguf file or Hub id) into a masked diffusion checkpoint that "
            "loads with transformers alone (trust_remote_code).",
            ("source", "local model directory, .gguf file, or Hugging Face Hub model id"),
            ("output", "directory to create"))
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
    for job, (summary, description, recipes, example) in recipe_jobs.items():  # options: the recipe's dataclasses
        command(job, None, _train, summary, description, ("recipe", f"YAML recipe (see {recipes})"),
                ("overrides", f"dotted key=value overrides, e.g. output_dir=runs/x max_steps=10 {example}", "*"),
                ).set_defaults(job=job)
    command("generate", GenerateOptions, _generate, "decode text from a diffusion checkpoint",
            "Iterative-unmasking decoding from a dlm-adapt checkpoint.",
            ("model", "a dlm-adapt checkpoint directory or Hub id"))
    command("push", PushOptions, _push, "upload a checkpoint or adapter to the Hugging Face Hub with a model card",
            "Validate DIR (a dlm-adapt checkpoint, or a PEFT adapter of one), generate its model card, and upload "
            "everything in one commit. The token comes from HF_TOKEN or `hf auth login`; DIR is never modified.",
            ("directory", "checkpoint directory (e.g. OUTPUT/final) or PEFT adapter"),
            ("repo_id", "Hub repo, namespace/name; created if missing"))
    command("eval", EvalOptions, _eval, "likelihood, infilling and steps-sweep metrics on held-out text",
            "Evaluate a diffusion checkpoint (Monte-Carlo ELBO, infilling, quality against decoding steps) or a "
            "causal LM (exact NLL, left-context baseline) on the same packed sequences of text. Prints the result as "
            "JSON.", ("model", "a dlm-adapt checkpoint, a causal LM directory, a .gguf file, or a Hub id"))
    command("upgrade", UpgradeOptions, _upgrade, "update an older dlm-adapt checkpoint's remote code to this release",
            "Rewrite the remote-code files and outdated config fields of a checkpoint written by an earlier dlm-adapt "
            "(e.g. one that fails with transformers alone after a transformers upgrade), in place; each file is "
            "replaced atomically and weight files stay byte-identical. Works on convert outputs, OUTPUT/final and "
            "OUTPUT/checkpoints/step-N. Push the directory again to update a Hub repo.",
            ("directory", "a dlm-adapt checkpoint directory"))
    command("serve", ServeOptions, _serve, "serve a checkpoint over an OpenAI-compatible HTTP API",
            "Load MODEL once and serve /v1/completions, /v1/chat/completions (streaming as server-sent events), "
            "/v1/models and /health; requests that arrive together decode as one batch. Needs the serve extra "
            "(pip install 'dlm-adapt[serve]'). Ctrl-C or SIGTERM stops it.",
            ("model", "a dlm-adapt checkpoint directory or Hub id"))
    return parser


def _quiet_libraries():
    """What transformers and its helpers print that is not the user's business on the command line: its own
    progress bars (loading weights, writing shards; they would stand before a one-line error, and a run prints its
    own progress) and the `kernels` package's notice that an offline Hub skips its publisher check. Download bars
    of huggingface_hub stay, as the user set them. The Python API leaves these to the caller."""
    import logging

    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    downloads = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns huggingface_hub's off, which is put back
    if downloads:
        huggingface_hub.utils.enable_progress_bars()
    logging.getLogger("kernels").setLevel(logging.ERROR)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag argparse refused (2, its one line printed)
        return e.code
    _quiet_libraries()
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
