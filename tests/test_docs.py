"""Every code block in the READMEs and card templates runs offline, exactly as printed, or says what it needs.

A ```python or ```bash block whose first line is ``# needs ...`` (the Hub, PyPI, GPUs, the team's data...) is
not run; every other block of a file runs in order in one fresh folder, Python blocks in one namespace
(``>>>`` blocks as doctests), bash blocks line by line with ``HF_HUB_OFFLINE=1``.
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
DOCS = [
    "README.md",
    "metrics/legend_margin/README.md",
    "examples/README.md",
    "hub_cards/README.md",
    "hub_cards/direction_card_template.md",
    "hub_cards/dataset_card_template.md",
    "legend_hf/data/smv-smollm2/README.md",
    "legend_hf/data/smv-gemma3-270m/README.md",
]
CARDS = [d for d in DOCS if d.endswith("_template.md") or d.startswith("legend_hf/data/smv-")]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.M | re.S)


def blocks(doc: str) -> list[tuple[str, str]]:
    return BLOCK.findall((REPO / doc).read_text())


def needs(code: str) -> str | None:
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    return first if first.startswith("# needs ") else None


def test_the_docs_have_code_and_the_runner_sees_it():
    counts = {doc: len(blocks(doc)) for doc in DOCS}
    assert counts["README.md"] >= 10 and counts["metrics/legend_margin/README.md"] >= 2
    assert all(counts[doc] >= 1 for doc in DOCS if doc.endswith("_template.md"))


@pytest.mark.parametrize("doc", CARDS)
def test_card_snippets_say_they_need_the_hub(doc):
    """Cards live on the Hub: their snippets load Hub repos, and say so with the offline equivalent."""
    for _, code in blocks(doc):
        assert needs(code) and "offline" in needs(code), code


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
@pytest.mark.parametrize("doc", [d for d in DOCS if d not in CARDS])
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
    assert ran or doc != "README.md"
