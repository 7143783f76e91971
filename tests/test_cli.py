"""The ``dtop`` command line as a whole: every sub-command is listed, and --help stays fast."""

import subprocess
import sys

from dtop.cli.main import COMMANDS, build_parser


def test_every_command_has_a_parser_with_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == COMMANDS
    helps = {action.dest: action.help for action in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"dtop {name} has no one-line help in `dtop --help`"
        assert p.description, f"dtop {name} has no description in `dtop {name} --help`"
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"dtop {name} {action.option_strings[0]} has no help text"


def test_building_the_parsers_does_not_import_torch():
    # `dtop --help` and every `dtop CMD --help` answer without the ~1.5 s torch import
    code = "import sys; from dtop.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
