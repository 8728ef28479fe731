"""The command line and the job configs agree, over every entry of `cli.COMMANDS` (so over every job wired in later):
every field is a flag with the field's default and help, every flag is a field; every subcommand's --help works; and every
subcommand refuses an unwritable --out and a missing device with one line and exit code 2."""
import argparse, contextlib, dataclasses, io
from unittest import mock

import pytest

from spn4cir import cli
from spn4cir.cli import COMMANDS, Choice, build_parser, config_fields, default_text, entry_configs, flag_kwargs, flag_name, main

NOT_FIELDS = {"help", "_config_file", "_choice"}   # --help, --config FILE, and a Choice's picking flag (train --stage)
# what a subcommand needs besides its required fields for its config's check() to pass
VALID = {"positives": {"window": "0.2:0.5", "model": "m"}, "eval": {"data": "cirr=x"}, "index": {"images": "x"}, "search": {"image": "x", "text": "y"}}

def subparsers(parser:argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

SUB = subparsers(build_parser())

def run_main(*argv) -> tuple[int, str, str]:
    "`main(argv)` in this process: (exit code, stdout, stderr)."
    with contextlib.redirect_stdout(io.StringIO()) as o, contextlib.redirect_stderr(io.StringIO()) as e:
        try: code = main(list(map(str, argv)))
        except SystemExit as x: code = x.code
    return code, o.getvalue(), e.getvalue()

def sample(action:argparse.Action) -> list[str]:
    "A valid-looking value for an argument, as command-line words."
    if action.choices: return [str(list(action.choices)[0])]
    word = {int: "1", float: "1.0"}.get(action.type, "x")
    return [word] * (action.nargs if isinstance(action.nargs, int) else 1)

def required_args(name:str, **fixed) -> list[str]:
    "The arguments subcommand `name` requires (a field without default, a Choice's flag), with sample values; `fixed` wins."
    words, fixed = [], VALID.get(name, {}) | fixed
    for a in SUB[name]._actions:
        dest = a.dest.lstrip("_")
        if dest in fixed: continue
        if a.required or (a.help or "").endswith("(required)"): words += [a.option_strings[0], *sample(a)]
    for dest, value in fixed.items(): words += [flag_name(dest), str(value)]
    return words

# ---------------------------------------------------------------- fields and flags

@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_field_is_a_flag_with_its_default_and_help(name):
    actions, configs = {a.dest: a for a in SUB[name]._actions}, entry_configs(COMMANDS[name])
    for cls in configs.values():
        for f in config_fields(cls):
            assert f.help, f"{cls.__name__}.{f.name} has no help comment"
            action = actions.get(f.name)
            assert action is not None, f"{cls.__name__}.{f.name} has no flag"
            assert action.option_strings[0] == flag_name(f.name) and action.default is argparse.SUPPRESS
            shown = "required" if f.default is dataclasses.MISSING else f"default: {default_text(f.default)}"
            help = action.help.replace("%%", "%")
            assert f.help in help and shown in help, (help, f)
            if len(configs) == 1: assert help == f"{f.help} ({shown})"
            assert {k: v for k, v in flag_kwargs(f.kind).items() if k in ("choices", "nargs", "type")} == \
                   {k: getattr(action, k) for k in ("choices", "nargs", "type") if k in flag_kwargs(f.kind)}

@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_is_a_field(name):
    fields = {f.name for cls in entry_configs(COMMANDS[name]).values() for f in config_fields(cls)}
    for action in SUB[name]._actions:
        if action.dest in NOT_FIELDS: continue
        assert action.dest in fields, f"{name}: {action.option_strings} is no field of {entry_configs(COMMANDS[name])}"

@pytest.mark.parametrize("name", list(COMMANDS))
def test_flags_left_out_give_the_field_defaults(name):
    "Parsing only the required flags gives a config equal to the dataclass with those values (every default from the field)."
    entry = COMMANDS[name]
    for key, command in (entry.commands.items() if isinstance(entry, Choice) else [(None, entry)]):
        fixed = {} if key is None else {entry.flag: key}
        args = SUB[name].parse_args(required_args(name, **fixed))
        got, config = cli.resolve(args)
        assert got is command
        given = {f.name: getattr(config, f.name) for f in config_fields(command.config)
                 if f.default is dataclasses.MISSING or f.name in VALID.get(name, {})}
        assert config == command.config(**given)

CHOICES = [(name, key, other) for name, entry in COMMANDS.items() if isinstance(entry, Choice)
           for key in entry.commands for other in entry.commands if other != key]

@pytest.mark.parametrize("name, key, other", CHOICES)
def test_a_choice_refuses_a_flag_its_config_lacks(name, key, other):
    "Every flag of one job of a Choice that another lacks (train --stage 1 --neg-num 5) is refused there, never ignored."
    entry = COMMANDS[name]
    mine = {f.name for f in config_fields(entry.commands[key].config)}
    theirs = [f for f in config_fields(entry.commands[other].config) if f.name not in mine]
    assert theirs or name != "train", "the training stages have fields of their own"
    for f in theirs:
        extra = [flag_name(f.name), *sample(next(a for a in SUB[name]._actions if a.dest == f.name))]
        with pytest.raises(cli.SpnError, match=f"^{flag_name(f.name)} does not apply to {entry.flag} {key}$"):
            cli.resolve(SUB[name].parse_args(required_args(name, **{entry.flag: key}) + extra))

# ---------------------------------------------------------------- every subcommand

@pytest.mark.parametrize("name", list(SUB))
def test_help_of_every_subcommand(name):
    code, out, _ = run_main(name, "--help")
    assert code == 0 and out.startswith(f"usage: spn4cir {name}"), out

def _walk(flag:str) -> list[str]:
    names = [n for n in SUB if any(a.dest == flag for a in SUB[n]._actions)]
    assert names, flag
    return names

@pytest.mark.parametrize("name", _walk("out"))
def test_unwritable_out_is_one_line_and_exit_2(name, tmp_path):
    "A file where the output's folder should be (root ignores permissions, not this)."
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    code, _, err = run_main(name, *required_args(name, out=out))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(tmp_path / "a_file") in err and "a file stands where a folder is expected" in err, err

@pytest.mark.parametrize("name", _walk("device"))
@pytest.mark.parametrize("device, says", [("tpu", "unknown device 'tpu'"), ("cuda", "CUDA is not available on this machine")])
def test_missing_device_is_one_line_and_exit_2(name, device, says, tmp_path):
    with mock.patch("torch.cuda.is_available", return_value=False):
        code, _, err = run_main(name, *required_args(name, out=tmp_path / "out", device=device))
    assert code == 2 and err.count("\n") == 1 and says in err and "--device cpu" in err, err
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("name", list(COMMANDS))
def test_bad_config_file_is_one_line_and_exit_2(name, tmp_path):
    (tmp_path / "settings.json").write_text('{"job": "someone-else"}')
    fixed = {COMMANDS[name].flag: list(COMMANDS[name].commands)[0]} if isinstance(COMMANDS[name], Choice) else {}
    code, _, err = run_main(name, "--config", tmp_path / "settings.json", *required_args(name, **fixed))
    assert code == 2 and err.count("\n") == 1 and "settings.json: holds the settings of a 'someone-else' job" in err, err
