"""The README, the documentation site and `nimbleml --help` say the same thing.

- the site builds with ``mkdocs build --strict`` (a broken link, a missing page or a docstring
  griffe cannot read fails);
- ``docs/cli.md`` names exactly the parser's commands, with the parser's one-line help, and its
  options tables name exactly a command's options, with their defaults;
- every ``nimbleml`` command in the README and in the docs' how-to sections parses with the real
  parser (no removed flag, no renamed command);
- the README's quick-start commands either run here on tiny data, or are listed in
  ``CANNOT_RUN`` with the reason and the test that runs them elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nimbleml.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# README quick-start lines that do not run in this test, and why (the key is the command:
# `nimbleml <command> [<sub>]`, or the program for other lines).
CANNOT_RUN: dict[str, str] = {
    "make demo": "about 11 minutes on 2 cores; it is the end-to-end demo itself",
    "make test": "runs the whole suite, this test included",
    "nimbleml risk evaluate": "minutes even on the bundled series; tests/risk/test_commands.py runs "
                              "`risk evaluate` on a synthetic market folder",
    "nimbleml risk report": "needs a `risk evaluate` run folder; tests/risk/test_commands.py "
                            "(test_report_from_a_run_folder_writes_every_figure) runs it on one",
    "nimbleml compress": "ONNX export and int8 calibration take ~20 s on 2 shared cores; "
                         "tests/rec/test_compression.py runs every recipe on a tiny model",
    "nimbleml export": "ONNX export with parity on every runtime takes ~20 s; "
                       "tests/commands/test_export.py runs it on a tiny model",
    "nimbleml bench rec": "times every row for seconds; tests/commands/test_bench_rec.py runs it "
                          "with --quick on a tiny model",
    "nimbleml serve": "a long-running server; tests/serve/conftest.py starts `nimbleml serve` on a tiny "
                      "model and tests/serve/test_http.py sends it Recommends",
    "curl": "needs the running server above; tests/serve/test_http.py sends the same request",
    "nimbleml loadtest": "needs a running server; tests/serve/test_loadgen.py runs `loadtest` "
                         "against one",
}

# README quick-start commands that run here, in a temporary folder, on a tiny SYNTHETIC log:
# the options each needs on top of what the README says, and why.
TINY_OPTIONS: dict[str, list[str]] = {
    "KEY=$(python3": [],  # the shell line itself, run by bash
    "nimbleml rec prepare": [],  # --data is swapped for a tiny log in the README's format (see below)
    "nimbleml rec train": ["--preset", "small", "--epochs", "1", "--threads", "1"],  # seconds, not 17 minutes
    "nimbleml rec index": [],
    "nimbleml rec recommend": [],
}

# Sections whose commands are records of what made a table (kept as they were run), not how-tos.
RECORD_SECTIONS = re.compile(r"^#+ (Results|Earlier results|Training modes)", re.M)


# ------------------------------------------------------------------ helpers
def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def cli_commands() -> dict[str, str]:
    """`nimbleml <cmd>` or `nimbleml <cmd> <sub>` (leaves only) -> its one-line help."""
    out = {}
    top = _subparsers(build_parser())
    helps = {a.dest: a.help for a in top._choices_actions}
    for name, parser in top.choices.items():
        inner = _subparsers(parser)
        if inner is None:
            out[f"nimbleml {name}"] = helps[name]
            continue
        inner_helps = {a.dest: a.help for a in inner._choices_actions}
        for sub in inner.choices:
            out[f"nimbleml {name} {sub}"] = inner_helps[sub]
    return out


def documented_commands() -> dict[str, str]:
    """docs/cli.md: every heading naming a command -> the quoted help line under it; groups
    (headings that are a prefix of another heading) are left out."""
    text = (DOCS / "cli.md").read_text()
    found = dict(re.findall(r"^#+ `(nimbleml [a-z -]+?)`.*\n\n> (.*)", text, re.M))
    found.update({name: "" for name in re.findall(r"^#+ `(nimbleml [a-z -]+?)`", text, re.M) if name not in found})
    return {k: v for k, v in found.items() if not any(o.startswith(k + " ") for o in found)}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `nimbleml <cmd> [<sub>]`."""
    parser = build_parser()
    for word in name.split()[1:]:
        parser = _subparsers(parser).choices[word]
    return parser


def default_cell(action: argparse.Action) -> str:
    """How docs/cli.md's options tables write an option's default."""
    value = action.default
    if action.required:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    if isinstance(value, float) and value >= 1000 and value.is_integer():
        return f"{int(value):,}"  # rates: 6,000
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"  # counts: 1,000,000 (ports stay 8000)
    return str(value)


def parser_options(name: str) -> dict[str, str]:
    """`--option` -> its default cell, for the options `--help` shows (hidden ones left out)."""
    return {action.option_strings[-1]: default_cell(action) for action in command_parser(name)._actions
            if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help"}


def documented_options() -> dict[str, dict[str, str]]:
    """docs/cli.md: command -> {`--option`: default cell} from the options table in its section
    (commands without a table left out)."""
    text = (DOCS / "cli.md").read_text()
    out = {}
    for section in re.split(r"(?=^#+ `nimbleml )", text, flags=re.M):
        heading = re.match(r"^#+ `(nimbleml [a-z -]+?)`", section)
        rows = re.findall(r"^\| `(--[a-z0-9-]+)[^`]*` \| ([^|]*?) \|", section, re.M)
        if heading and rows:
            out[heading.group(1)] = dict(rows)
    return out


def fenced_blocks(text: str, lang: str = "bash") -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def shell_lines(block: str) -> list[str]:
    """One entry per command: continuation lines joined, blank and comment-only lines dropped."""
    lines = (line.strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def command_key(line: str) -> str:
    words = shlex.split(line, comments=True)
    while words and re.match(r"^[A-Z_]+=", words[0]) and len(words) > 1 and "nimbleml" in words[1]:
        words = words[1:]  # VAR=value before the command
    if not words[0].endswith("nimbleml"):
        return " ".join(words[:2]) if words[0] == "make" else line.split()[0]
    subs = []
    for word in words[1:]:
        if word.startswith("-") or len(subs) == 2:
            break
        subs.append(word)
    return " ".join(["nimbleml", *subs])


def nimbleml_argv(line: str) -> list[str] | None:
    """The arguments after `nimbleml` on a shell line, shell variables left as they are."""
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word.endswith("nimbleml"):
            return words[i + 1:]
    return None


def readme_quick_start() -> list[str]:
    text = README.read_text()
    start = text.index("## Set-up")
    end = text.index("\n## ", text.index("## Quick start") + 1)
    return [line for block in fenced_blocks(text[start:end]) for line in shell_lines(block)]


def howto_lines() -> list[tuple[str, str]]:
    """(file, line) of every shell line in the README and the docs outside record sections."""
    out = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        if path.name == "history.md":
            continue
        for section in re.split(r"(?=^## )", path.read_text(), flags=re.M):
            if RECORD_SECTIONS.match(section):
                continue
            out += [(path.name, line) for block in fenced_blocks(section) for line in shell_lines(block)]
    return out


# ------------------------------------------------------------------ the site
def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings are not installed: `pip install -e '.[test]'` installs them")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "serving.html").is_file()


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == set(re.findall(r":\s+(\S+\.md)\s*$", nav, re.M))


def test_readme_stays_short_and_the_home_page_has_its_headline_table() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    rows = [line.replace("](docs/", "](") for line in text.splitlines() if line.startswith("| ")]
    home = (DOCS / "index.md").read_text().splitlines()
    assert rows and [r for r in rows if r not in home] == [], "docs/index.md's headline table differs from the README's"


# ------------------------------------------------------------------ CLI reference
def test_cli_reference_names_every_command_and_no_other() -> None:
    parser_side, docs_side = set(cli_commands()), set(documented_commands())
    assert parser_side - docs_side == set(), "commands missing from docs/cli.md"
    assert docs_side - parser_side == set(), "docs/cli.md names commands the CLI does not have"


def test_cli_reference_quotes_the_help_the_parser_prints() -> None:
    docs = documented_commands()
    wrong = {name: (docs[name], help_) for name, help_ in cli_commands().items() if docs.get(name) != f"{help_}."}
    assert wrong == {}, "docs/cli.md's line under each command must be its --help line plus a full stop"


def test_cli_reference_option_tables_match_the_parser() -> None:
    tables = documented_options()
    assert {"nimbleml serve", "nimbleml bench serve", "nimbleml loadtest"} <= set(tables)
    wrong = {}
    for name, documented in tables.items():
        actual = parser_options(name)
        if documented != actual:
            wrong[name] = {"missing from the table": sorted(set(actual) - set(documented)),
                           "not options of the command": sorted(set(documented) - set(actual)),
                           "wrong default (table, parser)": {o: (documented[o], actual[o])
                                                             for o in set(documented) & set(actual)
                                                             if documented[o] != actual[o]}}
    assert wrong == {}, "docs/cli.md's options tables and the parser differ"


def test_every_documented_command_parses_with_todays_parser() -> None:
    parser = build_parser()
    failures, checked = [], 0
    for where, line in howto_lines():
        argv = nimbleml_argv(line)
        if argv is None:
            continue
        checked += 1
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser.parse_args(argv)
            except SystemExit:
                failures.append(f"{where}: {line}\n    {err.getvalue().strip().splitlines()[-1]}")
    assert failures == [], "\n".join(failures)
    assert checked >= 20  # the README's and every workload page's commands were found


# ------------------------------------------------------------------ README quick start
def test_every_quick_start_command_runs_here_or_says_why_not() -> None:
    keys = [command_key(line) for line in readme_quick_start()]
    assert "nimbleml rec train" in keys and "nimbleml serve" in keys  # the extraction found the blocks
    unclassified = [k for k in keys if k not in CANNOT_RUN and k not in TINY_OPTIONS]
    assert unclassified == [], "add each to TINY_OPTIONS (runs here) or CANNOT_RUN (with the reason)"
    assert set(CANNOT_RUN) | set(TINY_OPTIONS) <= set(keys), "stale entries: the README no longer has them"


def _tiny_sasrec_log(path: Path, users: int = 150, events: int = 20, items: int = 500) -> Path:
    """A SYNTHETIC `user item` log in Video.txt's format; every item id 1..items occurs."""
    lines = [f"{u} {(u * 7 + j * 13) % items + 1}\n" for u in range(1, users + 1) for j in range(events)]
    path.write_text("".join(lines))
    return path


def test_readme_quick_start_runs_on_tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_log = _tiny_sasrec_log(tmp_path / "Video.txt")
    ran = []
    for line in readme_quick_start():
        key = command_key(line)
        if key not in TINY_OPTIONS:
            continue
        if not key.startswith("nimbleml"):
            done = subprocess.run(["bash", "-c", f"{line} && test -n \"$KEY\""], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            ran.append(key)
            continue
        argv = nimbleml_argv(line)
        if key == "nimbleml rec prepare":
            argv[argv.index("--data") + 1] = str(tiny_log)  # the README's real log -> the tiny one, same format
        code = main([*argv, *TINY_OPTIONS[key]])
        assert code == 0, f"{line} (+ {TINY_OPTIONS[key]}) exited {code}:\n{capsys.readouterr().err}"
        ran.append(key)
    assert sorted(ran) == sorted(TINY_OPTIONS)
    assert (tmp_path / "runs/video/model/metrics.json").is_file()
