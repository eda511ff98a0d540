"""The README's commands name commands, options and stage configs that exist (a stale option in a user
guide fails here); running them is what the other tests do, on smaller data."""

from __future__ import annotations

import re
import shlex

import pytest
from typer.main import get_command

from amid_pipeline.cli import app
from tests.helpers import ROOT

GLOBAL_OPTIONS_WITH_VALUES = ("--remote-cache", "--storage-options")  # the app's own, before the command


def readme_commands() -> list[str]:
    """Every `amid-pipeline ...` (or `-m amid_pipeline ...`) line of the README's bash blocks, continuations
    joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if re.search(r"(^|\s)amid-pipeline\s+(-|[a-z])|-m amid_pipeline\s", line) and not line.startswith("git "):
                lines.append(line)
    return lines


def command_and_flags(line: str) -> tuple[str, list[str]]:
    words = shlex.split(line.replace("$", "VAR_"))
    start = next(i for i, w in enumerate(words) if w in ("amid-pipeline", "amid_pipeline")) + 1
    words = words[start:]
    while words and words[0] in GLOBAL_OPTIONS_WITH_VALUES:
        words = words[2:]
    command, rest = words[0], words[1:]
    return command, [w.split("=")[0] for w in rest if w.startswith("-")]


def test_the_readme_has_commands_to_check():
    commands = {command_and_flags(line)[0] for line in readme_commands()}
    assert {"quickstart", "cache-teacher", "distill", "eval", "sft", "init-student", "combine", "subset"} <= commands


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_uses_options_that_exist(line):
    group = get_command(app)
    command, flags = command_and_flags(line)
    assert command in group.commands, f"{line}: no command {command!r}"
    options = {opt for param in group.commands[command].params for opt in (*param.opts, *param.secondary_opts)}
    unknown = [flag for flag in flags if flag not in options]
    assert not unknown, f"{line}: {command} has no option {unknown}"
    words = shlex.split(line.replace("$", "VAR_"))
    for config in (words[i + 1] for i, w in enumerate(words[:-1]) if w == "-c" and words[i + 1].startswith("stages/")):
        assert (ROOT / config).is_file(), f"{line}: {config} does not exist"
