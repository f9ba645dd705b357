"""The shape of the ``maisi`` command line: every command and option of ``Testing/data/cli_options.json``
(written before ``maisicore.cli`` became a package) still exists, and ``maisi --help`` lists every
command. Options added since are fine; a removed or renamed one fails.

Regenerate the file (only when an option is removed or renamed on purpose) with
``python Testing/test_cli_layout.py --write``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "data" / "cli_options.json"
CLI = Path(__file__).resolve().parent.parent / "MAISICore" / "maisicore" / "cli"
MAX_FUNCTION_LINES = 80


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: parser} of a parser's sub-commands (none when it has no sub-command action)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """The parser's option strings (sorted) and its positional arguments (by dest, in order)."""
    options, positionals = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            options += action.option_strings
        else:
            positionals.append(action.dest)
    return {"options": sorted(options), "positionals": positionals}


def command_table(parser: argparse.ArgumentParser) -> dict[str, dict[str, list[str]]]:
    """{"generate": {...}, "weights init": {...}, ...}: every command path of the parser (the root is "")."""
    table, todo = {}, [("", parser)]
    while todo:
        path, current = todo.pop()
        table[path] = _options(current)
        for name, sub in _subcommands(current).items():
            todo.append((f"{path} {name}".strip(), sub))
    return dict(sorted(table.items()))


def _current() -> dict:
    from maisicore.cli import build_parser

    return command_table(build_parser())


def test_every_command_and_option_of_the_golden_file_is_still_there():
    golden = json.loads(GOLDEN.read_text())
    current = _current()
    missing_commands = sorted(set(golden) - set(current))
    assert not missing_commands, f"commands removed or renamed: {missing_commands}"
    problems = []
    for path, entry in golden.items():
        gone = sorted(set(entry["options"]) - set(current[path]["options"]))
        if gone:
            problems.append(f"maisi {path}: options removed or renamed: {gone}")
        if current[path]["positionals"][: len(entry["positionals"])] != entry["positionals"]:
            problems.append(f"maisi {path}: positionals {entry['positionals']} became {current[path]['positionals']}")
    assert not problems, "\n".join(problems)


def test_top_level_help_lists_every_command(maisi):
    from maisicore.cli import build_parser

    result = maisi("--help")
    assert result.returncode == 0, result.stderr
    commands = _subcommands(build_parser())
    golden = {path for path in json.loads(GOLDEN.read_text()) if path and " " not in path}
    assert golden <= set(commands)
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(commands) <= listed, f"missing from `maisi --help`: {sorted(set(commands) - listed)}"


def test_the_console_script_and_the_package_list_name_the_cli_package():
    import tomllib

    import maisicore.cli

    project = tomllib.loads((CLI.parent.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["maisi"] == "maisicore.cli:main" and callable(maisicore.cli.main)
    assert "maisicore.cli" in project["tool"]["setuptools"]["packages"]


def test_no_function_of_the_command_line_is_longer_than_80_lines():
    """Options live next to their command's handler, in small functions (``maisicore/cli/*.py``)."""
    files = sorted(CLI.glob("*.py"))
    assert {"__init__.py", "common.py", "generate.py"} <= {f.name for f in files}
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - first + 1} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    GOLDEN.write_text(json.dumps(_current(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
