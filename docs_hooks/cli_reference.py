"""MkDocs hook: the CLI reference page (``cli.md``), generated from argparse at build time.

It imports :func:`latentattn.cli.build_parser`, walks every subcommand depth first and writes each
one's usage and options, so a renamed or added flag appears in the site without a hand-kept copy.
Options whose help is ``argparse.SUPPRESS`` (the deprecated spellings) are left out, as ``--help``
leaves them out. Listed under ``hooks:`` in ``mkdocs.yml``.
"""

from __future__ import annotations

import argparse
import html
import os
from collections.abc import Iterator
from typing import Any

PAGE = "cli.md"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each direct subcommand, in registration order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every command below ``parser``, depth first: (words after ``latentattn``, help, parser)."""
    for name, help_, sub in subcommands(parser):
        yield (*path, name), help_, sub
        yield from walk(sub, (*path, name))


def _cell(text: str) -> str:
    """One markdown table cell: one line, pipes escaped, angle brackets kept literal."""
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(text: str) -> str:
    """Inline code inside a table cell: HTML, so a ``|`` can be an entity and not end the cell."""
    text = html.escape(" ".join(text.split()), quote=False).replace("|", "&#124;")
    return f"<code>{text}</code>"


def _invocation(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if not action.option_strings:
        return formatter._metavar_formatter(action, action.dest)(1)[0]
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = formatter._format_args(action, action.dest.upper())
    return ", ".join(f"{s} {metavar}" for s in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.required or action.nargs == 0 or isinstance(action, argparse._HelpAction):
        return ""
    if action.default is None or action.default == argparse.SUPPRESS:
        return ""
    return f"`{action.default}`"


def options_table(parser: argparse.ArgumentParser) -> str:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        help_ = formatter._expand_help(action) if action.help else ""
        invocation = _invocation(action, formatter)
        if action.choices is not None and not isinstance(action.choices, dict) and "{" not in invocation:
            help_ = f"{help_} (one of: {', '.join(str(c) for c in action.choices)})".strip()
        if action.required and action.option_strings:
            help_ = f"**required.** {help_}"
        rows.append(f"| {_code(invocation)} | {_cell(help_)} | {_default(action)} |")
    if not rows:
        return ""
    return "| option | meaning | default |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage lines without ``usage:``, wrapped at 100 columns whatever the terminal."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        text = parser.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    prefix = "usage: "
    lines = text.removeprefix(prefix).splitlines()
    return "\n".join([lines[0]] + [line.removeprefix(" " * len(prefix)) for line in lines[1:]])


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole page as markdown."""
    if parser is None:
        from latentattn.cli import build_parser

        parser = build_parser()
    prog = parser.prog
    lines = [
        "# Command line reference",
        "",
        f"Generated from `{prog}`'s own argument parser when the site is built, so it lists the",
        "options of the installed version. `--help` on any command prints the same text. User",
        "errors print one line `latentattn: error: ...` on stderr and exit with status 2.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        parser.description or "",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    commands = list(walk(parser))
    for path, help_, _ in commands:
        name = " ".join(path)
        lines.append(f"| [`{prog} {name}`](#{_anchor(path)}) | {_cell(help_)} |")
    lines.append("")
    for path, help_, sub in commands:
        lines += [f"{'#' * (1 + len(path))} {prog} {' '.join(path)} {{ #{_anchor(path)} }}", ""]
        description = sub.description or help_
        if description:
            lines += [description.strip(), ""]
        lines += ["```text", _usage(sub), "```", ""]
        children = subcommands(sub)
        if children:
            lines += ["| subcommand | what it does |", "|---|---|"]
            lines += [f"| [`{name}`](#{_anchor((*path, name))}) | {_cell(h)} |" for name, h, _ in children]
            lines.append("")
        table = options_table(sub)
        if table:
            lines += [table]
        if sub.epilog:
            lines += [sub.epilog.strip(), ""]
    return "\n".join(lines)


def _anchor(path: tuple[str, ...]) -> str:
    return "-".join(path)


def on_files(files: Any, config: Any) -> Any:
    """Add the generated ``cli.md`` to the site's files (mkdocs >= 1.6: ``File.generated``)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files
