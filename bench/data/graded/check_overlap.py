"""Flag graded.jsonl prompts that repeat or closely paraphrase a prompt of the project's other data.

Standard library only. Run from anywhere:

    python bench/data/graded/check_overlap.py [--shared ../shared/data] [--top 10]

For every graded prompt it finds the most similar reference prompt by two measures and flags the pair when
either passes its threshold:

- word overlap: Jaccard similarity of the content-word sets (lower-cased, light plural stripping, stop words
  removed), flagged at >= 0.5;
- character similarity: difflib's SequenceMatcher ratio of the normalized strings, flagged at >= 0.75.

References: legend_hf/data/fit_harmful.jsonl, legend_hf/data/advbench_fit.jsonl,
legend_hf/data/sample_preferences.jsonl, <shared>/advbench/harmful_behaviors.csv (goal) and
<shared>/harmbench/harmbench_behaviors_text_all.csv (Behavior). The graded prompts are also compared with
each other. Exit status 1 when anything is flagged or a reference file is missing.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
JACCARD_FLAG = 0.5
RATIO_FLAG = 0.75
STOP = set(
    """a an the and or but if so to of in on at for from by with without into onto over under about
as is are was were be been being do does did doing have has had having i me my mine we our ours you your
yours he him his she her hers it its they them their theirs this that these those there here what which who
whom whose how why when where can could would should will shall may might must just not no nor than then
too very some any all each every more most much many such own same other another up down out off again
further once only also even still get got make made let lets tell give write explain describe help want
need way ways someone something anyone people person one thing things like""".split()
)


def normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'")))


def content_words(text: str) -> set[str]:
    words = set()
    for w in normalize(text).split():
        w = w.strip("'")
        if w.endswith("'s"):
            w = w[:-2]
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        if w and w not in STOP:
            words.add(w)
    return words


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def load_references(shared: Path) -> tuple[list[tuple[str, str]], list[str]]:
    refs: list[tuple[str, str]] = []
    missing: list[str] = []
    for name in ("fit_harmful.jsonl", "advbench_fit.jsonl", "sample_preferences.jsonl"):
        path = REPO / "legend_hf" / "data" / name
        if not path.exists():
            missing.append(str(path))
            continue
        with path.open(encoding="utf-8") as fh:
            refs += [(name, json.loads(line)["prompt"]) for line in fh if line.strip()]
    for rel, column in (
        ("advbench/harmful_behaviors.csv", "goal"),
        ("harmbench/harmbench_behaviors_text_all.csv", "Behavior"),
    ):
        path = shared / rel
        if not path.exists():
            missing.append(str(path))
            continue
        with path.open(encoding="utf-8", newline="") as fh:
            refs += [(rel, row[column]) for row in csv.DictReader(fh) if row.get(column)]
    return refs, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE / "graded.jsonl"))
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--top", type=int, default=10, help="print the N most similar pairs")
    args = ap.parse_args()

    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    refs, missing = load_references(Path(args.shared))
    for m in missing:
        print(f"MISSING reference file: {m}")
    ref_prep = [(src, p, content_words(p), normalize(p)) for src, p in refs]
    print(f"{len(rows)} graded prompts vs {len(refs)} reference prompts")

    pairs = []  # (jaccard, ratio, graded id, graded prompt, source, other prompt)
    for row in rows:
        cw, norm = content_words(row["prompt"]), normalize(row["prompt"])
        best = None
        for src, p, pw, pn in ref_prep:
            j = jaccard(cw, pw)
            r = difflib.SequenceMatcher(None, norm, pn, autojunk=False).ratio()
            key = (max(j / JACCARD_FLAG, r / RATIO_FLAG), j, r)
            if best is None or key > best[0]:
                best = (key, j, r, src, p)
        pairs.append((best[1], best[2], row["id"], row["prompt"], best[3], best[4]))
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            j = jaccard(content_words(a["prompt"]), content_words(b["prompt"]))
            r = difflib.SequenceMatcher(
                None, normalize(a["prompt"]), normalize(b["prompt"]), autojunk=False
            ).ratio()
            pairs.append((j, r, a["id"], a["prompt"], f"graded {b['id']}", b["prompt"]))

    pairs.sort(key=lambda t: max(t[0] / JACCARD_FLAG, t[1] / RATIO_FLAG), reverse=True)
    flagged = [t for t in pairs if t[0] >= JACCARD_FLAG or t[1] >= RATIO_FLAG]
    print(
        f"\nmost similar pairs (flag at word-overlap Jaccard >= {JACCARD_FLAG} or character ratio >= {RATIO_FLAG}):"
    )
    for j, r, gid, gp, src, op in pairs[: args.top]:
        mark = "FLAG" if (j >= JACCARD_FLAG or r >= RATIO_FLAG) else "ok  "
        print(f"{mark} jaccard={j:.2f} ratio={r:.2f} {gid}: {gp}\n       ~ [{src}] {op}")
    print(f"\nexact duplicates: {sum(1 for t in pairs if normalize(t[3]) == normalize(t[5]))}")
    print(f"flagged pairs: {len(flagged)}")
    return 1 if flagged or missing else 0


if __name__ == "__main__":
    sys.exit(main())
