"""One typed config, one CLI: every dataclass field becomes `--name`, its `help` metadata the --help text."""
import argparse
import dataclasses
import json
import sys
import typing


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


def _base_type(hint):
    """str | None -> str; list[str] -> str; bool stays bool."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _base_type(args[0]) if args else hint


def parse_config(cls, argv: list[str] | None = None):
    """Parse argv into an instance of dataclass `cls`.

    Returns (config, explicit): `explicit` is the set of field names given on the command line, so that
    presets can fill in only what the user left alone.
    """
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in dataclasses.fields(cls):
        base = _base_type(hints[f.name])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kwargs = {"help": f"{f.metadata.get('help', '')} (default: {default})",
                  "type": _parse_bool if base is bool else base, "default": argparse.SUPPRESS}
        if base is bool:                      # `--flag` alone means true; `--flag false` also works
            kwargs.update(nargs="?", const=True)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("multiple"):
            kwargs["action"] = "append"
        parser.add_argument(f"--{f.name}", **kwargs)
    given = vars(parser.parse_args(argv))
    return cls(**given), set(given)


def config_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)
