"""One typed config, one CLI: every dataclass field becomes `--name`, its `help` metadata the --help text.

`--config FILE` (a JSON object, e.g. a run's saved train_config.json) supplies values as if they had been
typed, and flags on the command line win over it. Abbreviated flags are refused: `--learn 0.1` must not
quietly mean `--learning_rate`.
"""
import argparse
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path


def field(default, help: str, **metadata):
    """A dataclass field that carries its --help text. metadata: `choices=[...]`, or `multiple=True`
    for a repeatable flag collected into a list (its default must then be a list)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")   # a bool flag's values


def _parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_float(text: str) -> float:
    """A finite float: 'nan' and 'inf' are no learning rate, norm or coefficient."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _base_type(hint):
    """str | None -> str; list[str] -> str; bool stays bool."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if args else hint


PARSERS = {bool: _parse_bool, float: _parse_float}


def fail(prog: str, message: str):
    """Stop with one line on stderr, `prog: error: message`, and exit code 2 (argparse's for a bad command line)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (`prog: error: ...`, exit code 2), not the whole usage."""

    def error(self, message):
        fail(self.prog, f"{message} (see --help)")


def parse_config(cls, argv: list[str] | None = None, shown_defaults: dict[str, str] | None = None,
                 config_file: bool = False, ignored_in_file: tuple[str, ...] = (), prog: str | None = None):
    """Parse argv into an instance of dataclass `cls`.

    Returns (config, explicit): `explicit` is the set of field names given on the command line or in the
    --config file, so that presets can fill in only what the user left alone. `shown_defaults` replaces a
    field's "(default: ...)" in --help. With `config_file`, `--config FILE` is accepted too; keys of
    `ignored_in_file` are skipped in that file (e.g. what a run did with its directory, not what it was). `prog` names the program in errors (default: argv[0]).
    """
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(cls)
    parser = OneLineParser(prog=prog, description=cls.__doc__, allow_abbrev=False)
    if config_file:
        parser.add_argument("--config", help="a JSON file of flag values (e.g. a run's train_config.json); "
                                             "flags given here win over it")
    for f in dataclasses.fields(cls):
        base = _base_type(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = (shown_defaults or {}).get(f.name, f"default: {default}")
        kwargs = {"help": f"{f.metadata.get('help', '')} ({shown})", "type": PARSERS.get(base, base),
                  "default": argparse.SUPPRESS}
        if base is bool:                      # `--flag` alone means true; `--flag false` also works
            kwargs.update(nargs="?", const=True)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("multiple"):
            kwargs["action"] = "append"
        parser.add_argument(f"--{f.name}", **kwargs)
    given = vars(parser.parse_args(argv))
    if config_file and (path := given.pop("config", None)):
        given = {**read_config_file(cls, path, parser, ignored_in_file), **given}
    return cls(**given), set(given)


def read_config_file(cls, path: str, parser: argparse.ArgumentParser, ignored: tuple[str, ...]) -> dict:
    """The values of a --config JSON file, each checked as its flag would be; an unknown key or a value of the
    wrong type is a one-line error (argparse's: usage, then the message; exit code 2) naming the key."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        parser.error(f"--config {path}: cannot read it as JSON ({e})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a JSON object of flag values")
    hints, fields = typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key in ignored:
            continue
        if key not in fields:
            parser.error(f"--config {path}: unknown key {key!r} (no --{key} flag)")
        base, f = _base_type(hints[key]), fields[key]
        optional = type(None) in typing.get_args(hints[key])
        many = f.metadata.get("multiple")
        items = value if many and isinstance(value, list) else [value]
        ok = (many or not isinstance(value, list)) and all(
            (item is None and optional) or type(item) is base or (base is float and type(item) is int)
            for item in items)
        if ok and base is float:
            ok = all(item is None or math.isfinite(item) for item in items)
        if ok and "choices" in f.metadata:
            ok = all(item in f.metadata["choices"] for item in items)
        if not ok:
            parser.error(f"--config {path}: {key} = {json.dumps(value)} is not a valid --{key}")
        checked[key] = float(value) if base is float and type(value) is int else value
    return checked


def config_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)
