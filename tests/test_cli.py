"""The command line is generated from the options dataclasses in `adapt.config`: every field is a flag, and there is
no flag that is not a field (or a positional argument of the job's Python function)."""

import dataclasses

import pytest

from adapt.cli import build_parser
from adapt.config import ConvertOptions, EvalOptions, GenerateOptions, PushOptions, ServeOptions, UpgradeOptions

COMMANDS = {"convert": ConvertOptions, "generate": GenerateOptions, "eval": EvalOptions, "push": PushOptions,
            "upgrade": UpgradeOptions, "serve": ServeOptions}


def _subparser(name):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_documented_field_and_every_field_a_flag(command):
    options = COMMANDS[command]
    parser = _subparser(command)
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(options)}
    assert flags == fields
    for f in dataclasses.fields(options):
        assert f.metadata.get("help"), f"{options.__name__}.{f.name} has no help"
        dashed = f"--{f.name.replace('_', '-')}"
        assert dashed in parser._option_string_actions, dashed


def test_parsed_defaults_are_the_dataclass_defaults():
    """One home per default: what the CLI passes when no flag is given is what the Python API assumes."""
    for command, options in COMMANDS.items():
        positionals = {"convert": ["s", "o"], "generate": ["m"], "eval": ["m", "--data", "d"], "push": ["d", "r/x"],
                       "upgrade": ["d"], "serve": ["m"]}[command]
        args = build_parser().parse_args([command, *positionals])
        parsed = options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options)})
        expected = options(**({"data": "d"} if command == "eval" else {}))
        assert parsed == expected, command


def test_switches_do_not_swallow_the_positional_after_them():
    args = build_parser().parse_args(["upgrade", "--check", "my-dlm"])
    assert args.check is True and args.directory == "my-dlm"
    args = build_parser().parse_args(["convert", "--overwrite", "src", "out", "--no-shift"])
    assert (args.overwrite, args.shift, args.source, args.output) == (True, False, "src", "out")
    assert build_parser().parse_args(["convert", "src", "out"]).shift is True


def test_repeated_prompts_each_add_one_text_and_keep_commas():
    args = build_parser().parse_args(["generate", "--prompt", "a, b", "m", "--prompt", "c"])
    assert GenerateOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateOptions)}).prompt == (
        "a, b", "c")


def test_comma_separated_flags_and_python_lists_agree():
    cli = build_parser().parse_args(["eval", "m", "--data", "d", "--metrics", "elbo,infill", "--sweep-steps", "1,4"])
    assert EvalOptions(data="d", metrics=cli.metrics, sweep_steps=cli.sweep_steps) == EvalOptions(
        data="d", metrics=["elbo", "infill"], sweep_steps=[1, 4])


def test_remasking_choices_are_the_sampler_table(monkeypatch, capsys):
    """Adding a remasking order is one table entry: the flag's choices are read from the sampler."""
    from adapt.model import sampling_masked_diffusion as sampler

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "m", "--remasking", "newest"])
    assert "invalid choice: 'newest'" in capsys.readouterr().err
    monkeypatch.setattr(sampler, "REMASKING", (*sampler.REMASKING, "newest"))
    assert build_parser().parse_args(["generate", "m", "--remasking", "newest"]).remasking == "newest"


def test_sampling_options_are_generate_flags_and_diffusion_generate_keywords():
    """One dataclass carries the decoding settings: each is a `generate` flag and a keyword of the remote code's
    `diffusion_generate`, and `kwargs()` hands over only the chosen ones (the checkpoint decides the rest)."""
    import inspect

    from adapt.config import SamplingOptions
    from adapt.model import MaskedDiffusionLM

    keywords = inspect.signature(MaskedDiffusionLM.diffusion_generate).parameters
    flags = {f.name for f in dataclasses.fields(GenerateOptions)}
    for f in dataclasses.fields(SamplingOptions):
        assert f.name in keywords and f.name in flags, f.name
    assert SamplingOptions().kwargs() == {}
    assert SamplingOptions(steps=4, temperature=0.0, speculative=True).kwargs() == {
        "steps": 4, "temperature": 0.0, "speculative": True}
    args = build_parser().parse_args(["generate", "m", "--steps", "8", "--kv-cache", "prefix"])
    parsed = GenerateOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GenerateOptions)})
    assert parsed.sampling() == SamplingOptions(steps=8, kv_cache="prefix")
