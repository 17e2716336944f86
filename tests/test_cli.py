"""One CLI convention: the console entry points of pyproject.toml, the scripts/ wrappers, option spellings, finite
floats, and bad input as one `error:` line with exit code 2 (spannorm_hf.cli)."""

import dataclasses
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import tomllib

from spannorm_hf.cli import ArgumentParser, InputError, command

from helpers import assert_one_error_line, run_script

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    "spannorm-train": ("train.py", "--seq-len"),
    "spannorm-finetune": ("finetune_lora.py", "--target-modules"),
    "spannorm-generate": ("generate.py", "--max-new-tokens"),
    "spannorm-evaluate": ("evaluate_model.py", "--include-path"),
    "spannorm-publish": ("publish.py", "--repo-id"),
}


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def load_entry_point(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def options(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z_-]*", help_text))


def test_every_command_is_a_console_script_and_a_script(monkeypatch, capsys):
    scripts = console_scripts()
    assert set(scripts) == set(ENTRY_POINTS)
    for name, target in scripts.items():
        script, option = ENTRY_POINTS[name]
        main = load_entry_point(target)
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith("usage:") and option in help_text, (name, help_text[:300])
        # the clone's wrapper runs the same command
        assert run_script(script, ["--help"], monkeypatch) == 0
        assert options(capsys.readouterr().out) == options(help_text)


def test_no_script_shadows_an_installed_module():
    """`python scripts/X.py` puts scripts/ first on sys.path: a script named like a library (evaluate.py and the
    `evaluate` package lm-eval imports) would be imported in its place."""
    assert str(ROOT / "scripts") not in sys.path
    for script in (ROOT / "scripts").glob("*.py"):
        assert importlib.util.find_spec(script.stem) is None, f"scripts/{script.name} shadows a module"


def test_every_option_answers_to_both_spellings():
    from spannorm_hf.integrations import evaluation, finetune, generation, hub
    from spannorm_hf.training import trainer

    parsers = [finetune.parser(), generation.parser(), evaluation.parser(), hub.publish_parser()]
    parsers.append(ArgumentParser(trainer.TrainArguments))
    for parser in parsers:
        options = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
        assert {"--" + s[2:].replace("-", "_") for s in options} <= options, parser.description
        assert {"--" + s[2:].replace("_", "-") for s in options} <= options, parser.description
    args = generation.parser().parse_args(["--model", "m", "--max_new_tokens", "7", "--top-p", "0.5"])
    assert args.max_new_tokens == 7 and args.top_p == 0.5
    assert trainer.parse_args(["--config", "c", "--output", "o", "--seq_len", "9"]).seq_len == 9
    assert trainer.parse_args(["--config", "c", "--output", "o", "--seq-len", "9"]).seq_len == 9


def cli_modules() -> dict:
    """Console script -> (the module holding its options, their dataclass)."""
    from spannorm_hf.integrations import evaluation, finetune, generation, hub
    from spannorm_hf.training import arguments

    return {
        "spannorm-train": (arguments, arguments.TrainArguments),
        "spannorm-finetune": (finetune, finetune.FinetuneArguments),
        "spannorm-generate": (generation, generation.GenerateArguments),
        "spannorm-evaluate": (evaluation, evaluation.EvaluateArguments),
        "spannorm-publish": (hub, hub.PublishArguments),
    }


def test_every_command_declares_its_options_as_one_dataclass(monkeypatch, capsys):
    """One argument style: each command's parser is its dataclass of options and nothing else (no `add_argument`
    beside it), every field has help, and `--help` prints each field's help with its default."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help to the terminal width; one line per option
    modules = cli_modules()
    assert set(modules) == set(console_scripts())
    for name, (module, arguments) in modules.items():
        parser = module.publish_parser() if name == "spannorm-publish" else module.parser()
        assert dataclasses.is_dataclass(arguments) and parser.dataclass_types == [arguments], name
        fields = dataclasses.fields(arguments)
        spellings = {f"--{field.name.replace('_', sep)}" for field in fields for sep in "_-"}
        declared = {s for action in parser._actions for s in action.option_strings if s not in ("-h", "--help")}
        assert declared == spellings, name
        with pytest.raises(SystemExit) as exit_info:
            load_entry_point(console_scripts()[name])(["--help"])
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        for field in fields:
            assert "help" in field.metadata, f"{name}: --{field.name} has no help"
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            default = None if default is dataclasses.MISSING else default  # a required option
            shown = " ".join(field.metadata["help"].split()) + f" (default: {default})"
            assert shown in help_text, f"{name}: --{field.name}: {shown!r} not in --help"


def test_repeated_list_options_add_up():
    """`--prompt` and `--dataset` were `action="append"`: repeating them still collects every value, as for every
    option that takes several."""
    from spannorm_hf.integrations import evaluation, finetune, generation, hub
    from spannorm_hf.training import arguments as train_arguments

    (args,) = generation.parser().parse_args_into_dataclasses(["--model", "m", "--prompt", "a", "--prompt", "b c"])
    assert args.prompt == ["a", "b c"]
    argv = ["--model", "m", "--repo-id", "a/b", "--dataset", "x", "--dataset", "y", "z"]
    assert hub.publish_parser().parse_args_into_dataclasses(argv)[0].dataset == ["x", "y", "z"]
    argv = ["--model", "m", "--data", "d", "--output", "o", "--target-parameters"]
    assert finetune.parser().parse_args_into_dataclasses(argv)[0].target_parameters == []  # given empty: none
    argv = ["--config", "c", "--output", "o", "--data", "a.txt", "--data", "b.txt"]
    assert train_arguments.parser().parse_args_into_dataclasses(argv)[0].data == ["a.txt", "b.txt"]
    assert train_arguments.parser().parse_args_into_dataclasses(argv[:4])[0].data is None
    argv = ["--model", "m", "--tasks", "a", "--tasks", "b", "c"]
    assert evaluation.parser().parse_args_into_dataclasses(argv)[0].tasks == ["a", "b", "c"]


def test_options_come_from_the_command_line_alone(tmp_path, monkeypatch):
    """HfArgumentParser would also read `<script>.args` beside the running script: a file nobody typed."""
    from spannorm_hf.integrations import generation

    (tmp_path / "spannorm-generate.args").write_text("--prompt planted --seed 7")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "spannorm-generate")])
    (args,) = generation.parser().parse_args_into_dataclasses(["--model", "m"])
    assert args.prompt == [] and args.seed == 0


TRAIN = ["--config", "c.json", "--output", "out"]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        ([*TRAIN, "--lr", "nan"], ["argument --lr", "nan is not a finite number", "(see --help)"]),
        ([*TRAIN, "--max-grad-norm", "inf"], ["--max-grad-norm", "inf is not a finite number"]),
        ([*TRAIN, "--lr", "fast"], ["--lr", "'fast' is not a number"]),
        ([*TRAIN, "--sq-len", "3"], ["unrecognized arguments: --sq-len 3"]),
        (["--output", "out"], ["the following arguments are required: --config"]),
        ([*TRAIN, "--batch-size", "0"], ["--batch-size must be >= 1, got 0"]),
    ],
)
def test_train_rejects_bad_options_in_one_line(tmp_path, monkeypatch, capsys, argv, fragments):
    from spannorm_hf.training.trainer import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, *fragments)
    assert captured.out == "" and not (tmp_path / "out").exists()  # nothing written


def test_command_handler_turns_bad_input_into_one_line_and_keeps_bugs_loud(capsys):
    @command
    def bad_value(argv):
        raise InputError("--x 3 must be\nbelow 2;   use --x 1")

    @command
    def missing_path(argv):
        raise FileNotFoundError("data 'a.txt' not found")

    @command
    def bug(argv):
        raise KeyError("a bug, not bad input")

    assert bad_value([]) == 2
    assert assert_one_error_line(capsys.readouterr().err) == "error: --x 3 must be below 2; use --x 1"
    assert missing_path([]) == 2
    assert_one_error_line(capsys.readouterr().err, "data 'a.txt' not found")
    with pytest.raises(KeyError):  # a bug keeps its traceback
        bug([])
