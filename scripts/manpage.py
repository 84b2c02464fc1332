"""Write ``man 1 PROGRAM`` (roff) for ``cortex`` or ``neuron`` from the program's own argparse
parser, so the manual says what ``--help`` says: ``python scripts/manpage.py cortex > cortex.1``.

The parser is the one ``PROGRAM.cli.main`` builds: ``main`` is run with ``parse_args`` replaced
by a hook that hands the parser back before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
# What each program reads, and the pages beside it.
FILES = {
    "cortex": ["/etc/cortex/cortex.toml", "/etc/cortex/models.toml"],
    "neuron": ["/etc/neuron/neuron.toml"],
}
SEE_ALSO = {"cortex": "neuron", "neuron": "cortex"}


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def parser_of(program: str) -> argparse.ArgumentParser:
    """The argparse parser ``PROGRAM.cli.main`` builds."""

    def hand_back(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Built(self)

    main = importlib.import_module(f"{program}.cli").main
    with mock.patch.object(argparse.ArgumentParser, "parse_args", hand_back):
        try:
            main([])
        except _Built as built:
            return built.parser
    raise RuntimeError(f"{program}.cli.main never parsed its arguments")


def _roff(text: str) -> str:
    """Text safe in roff: backslashes and hyphens escaped, no line starting with a control
    character."""
    lines = text.replace("\\", "\\e").replace("-", "\\-").splitlines()
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in lines)


def manpage(program: str) -> str:
    parser = parser_of(program)
    # The --version action holds "PROGRAM VERSION".
    stamp = next(
        (a.version for a in parser._actions if isinstance(a, argparse._VersionAction)), program
    )
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    out = [
        f'.TH {program.upper()} 1 "" "{_roff(str(stamp))}" "helexa"',
        ".SH NAME",
        f"{program} \\- {_roff(parser.description or '')}",
        ".SH SYNOPSIS",
        ".nf",
        _roff(parser.format_usage().removeprefix("usage: ").strip()),
        ".fi",
        ".SH COMMANDS",
    ]
    for name, sub in commands.choices.items():
        out += [
            ".SS " + _roff(name),
            _roff(helps.get(name) or ""),
            ".PP",
            ".nf",
            _roff(sub.format_help().strip()),
            ".fi",
        ]
    out += [".SH OPTIONS", ".nf", _roff(parser.format_help().strip()), ".fi"]
    out += [".SH FILES"] + [f".I {_roff(path)}\n.br" for path in FILES[program]]
    out += [".SH SEE ALSO", f".BR {SEE_ALSO[program]} (1),", ".I /usr/share/doc/helexa-"
            f"{program}/README.md"]  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal: the same page everywhere
    sys.path.insert(0, str(ROOT))
    sys.stdout.write(manpage(sys.argv[1]))
