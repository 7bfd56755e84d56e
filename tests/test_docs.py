"""Every code block in the READMEs, the docs/ pages and card templates runs offline, exactly as printed, or says what it needs.

A ```python or ```bash block whose first line is ``# needs ...`` (the Hub, PyPI, GPUs, the team's data...) is
not run; every other block of a file runs in order in one fresh folder, Python blocks in one namespace
(``>>>`` blocks as doctests), bash blocks line by line with ``HF_HUB_OFFLINE=1``. Each document has a known
number of blocks that run (none for examples/README.md and the cards, whose every block says what it needs), so
a block that stops running, or a document that loses its blocks, fails. bench/README.md's commands take an hour
or more each: they are checked to name scripts that exist with options those scripts take.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each document, with the number of its code blocks that run (at least): the others say what they need.
RUNS = {
    "README.md": 1,
    "docs/python.md": 3,
    "docs/cli.md": 3,
    "docs/metric-and-cards.md": 1,
    "metrics/legend_margin/README.md": 3,
}
CARDS = [
    "hub_cards/direction_card_template.md",
    "hub_cards/dataset_card_template.md",
    "legend_hf/data/smv-smollm2/README.md",
    "legend_hf/data/smv-gemma3-270m/README.md",
]
MARKED = {
    "examples/README.md": 7,
    "docs/scaling.md": 6,
    **dict.fromkeys(CARDS, 1),
}  # every block says what it needs
BENCH = "bench/README.md"
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.M | re.S)
COMMAND = re.compile(r"^python ((?:bench|scripts)/[\w/]+\.py)(.*)$")


def blocks(doc: str) -> list[tuple[str, str]]:
    return BLOCK.findall((REPO / doc).read_text())


def needs(code: str) -> str | None:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    return first if first.startswith("# needs ") else None


@pytest.mark.parametrize("doc", MARKED)
def test_every_block_says_what_it_needs(doc):
    """Cards live on the Hub: their snippets load Hub repos, and say so with the offline equivalent. The examples
    need the team's data or a long run."""
    found = blocks(doc)
    assert len(found) >= MARKED[doc]
    for _, code in found:
        assert needs(code) and (doc not in CARDS or "offline" in needs(code)), code


def test_every_docs_page_with_code_is_checked():
    """A new page under docs/ has its blocks run (RUNS) or checked to say what they need (MARKED)."""
    pages = {
        str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md") if blocks(str(p.relative_to(REPO)))
    }
    assert pages and pages <= set(RUNS) | set(MARKED)


def test_the_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in (REPO / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, page.name


def test_bench_commands_name_scripts_and_options_that_exist():
    commands: dict[str, set[str]] = {}
    for language, code in blocks(BENCH):
        if language == "python":  # a fragment of a long run
            assert needs(code), code
            continue
        for line in code.replace("\\\n", " ").splitlines():
            command = COMMAND.match(line.strip())
            if command:
                options = re.findall(r"(?<![\w-])--[\w-]+", command[2].split(" #")[0])
                commands.setdefault(command[1], set()).update(options)
    assert len(commands) >= 6 and sum(map(len, commands.values())) >= 20, commands
    for script, options in commands.items():
        result = subprocess.run(
            [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
        assert not options - set(re.findall(r"--[\w-]+", result.stdout)), (script, options)


def _run_bash(code: str, cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this environment's legend-hf
    commands = [
        c for c in code.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")
    ]
    for command in commands:
        result = subprocess.run(
            command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"


def _run_python(code: str, namespace: dict, doc: str) -> None:
    if ">>> " in code:
        test = doctest.DocTestParser().get_doctest(code, namespace, doc, doc, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        runner.run(test, clear_globs=False)
        assert runner.failures == 0, f"{doc}: a doctest failed (output above)"
    else:
        exec(compile(code, doc, "exec"), namespace)


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNS)
def test_every_unmarked_block_runs_as_printed(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__main__"}
    ran = 0
    for language, code in blocks(doc):
        if needs(code):
            continue
        if language == "bash":
            _run_bash(code, tmp_path)
        else:
            _run_python(code, namespace, doc)
        ran += 1
    assert ran >= RUNS[doc]
