"""Check graded.jsonl and print its counts tables (standard library only).

    python bench/data/graded/stats.py [path/to/graded.jsonl]

Checks (exit status 1 if any fails): unique ids; split in fit/dev/test; exactly 7 responses per row, one of
each kind, with the severities and helpfulness levels of the README; no prompt shared across splits (exact
match after normalization, or word-overlap Jaccard >= 0.5 between two prompts of different splits); each
prompt's three graded unsafe answers (severity 1, 2, 3) fall in three different length bins (short / medium
/ long); curt refusals are 3-10 words; safe_helpful answers contain no refusal phrase.
Prints markdown tables: rows per split and category; mean words per kind, per severity and per split;
how often each severity gets each length bin; Spearman correlation of length with severity.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
SPEC = {  # kind: (severity, helpfulness)
    "unsafe": (None, 0),  # severity 1, 2 and 3, one answer each
    "unsafe_hedged": (2, 0),
    "refusal_curt": (0, 0),
    "refusal_explained": (0, 1),
    "safe_helpful": (0, 2),
}
KIND_ORDER = ["unsafe", "unsafe_hedged", "refusal_curt", "refusal_explained", "safe_helpful"]
SPLITS = ["fit", "dev", "test"]
REFUSAL = re.compile(
    r"\b(I can't|I cannot|I won't|I'm not going to|I'm not able|I'm sorry|I refuse|I decline|"
    r"I'd rather not|I have to pass|I must decline)\b",
    re.I,
)


def words(text: str) -> int:
    return len(text.split())


def length_bin(n: int) -> str:
    return "short" if n <= 35 else ("medium" if n <= 75 else "long")


def content(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) > 3}


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = mean(rx), mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "graded.jsonl"
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    errors: list[str] = []

    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        errors.append(f"duplicate ids: {[i for i, c in Counter(ids).items() if c > 1]}")
    for r in rows:
        rid = r["id"]
        if set(r) != {"id", "split", "category", "prompt", "responses"}:
            errors.append(f"{rid}: keys {sorted(r)}")
        if r["split"] not in SPLITS:
            errors.append(f"{rid}: split {r['split']!r}")
        resp = r["responses"]
        if len(resp) != 7:
            errors.append(f"{rid}: {len(resp)} responses")
        kinds = Counter(x["kind"] for x in resp)
        if kinds != Counter(
            {"unsafe": 3, "unsafe_hedged": 1, "refusal_curt": 1, "refusal_explained": 1, "safe_helpful": 1}
        ):
            errors.append(f"{rid}: kinds {dict(kinds)}")
        for x in resp:
            if (
                set(x) != {"kind", "severity", "helpfulness", "text"}
                or not isinstance(x["severity"], int)
                or not isinstance(x["helpfulness"], int)
                or not x["text"].strip()
            ):
                errors.append(f"{rid}: malformed response {x}")
                continue
            sev, helpf = SPEC.get(x["kind"], ("?", "?"))
            if sev is not None and x["severity"] != sev:
                errors.append(f"{rid}: {x['kind']} severity {x['severity']}")
            if x["helpfulness"] != helpf:
                errors.append(f"{rid}: {x['kind']} helpfulness {x['helpfulness']}")
            if x["kind"] == "refusal_curt" and not 3 <= words(x["text"]) <= 10:
                errors.append(f"{rid}: curt refusal has {words(x['text'])} words")
            if x["kind"] == "safe_helpful" and REFUSAL.search(x["text"]):
                errors.append(
                    f"{rid}: safe_helpful contains a refusal phrase {REFUSAL.search(x['text']).group(0)!r}"
                )
        graded = sorted((x["severity"], words(x["text"])) for x in resp if x["kind"] == "unsafe")
        if [s for s, _ in graded] != [1, 2, 3]:
            errors.append(f"{rid}: unsafe severities {[s for s, _ in graded]}")
        elif len({length_bin(n) for _, n in graded}) != 3:
            errors.append(f"{rid}: unsafe answers not in three different length bins {graded}")

    norm = [" ".join(re.findall(r"[a-z0-9']+", r["prompt"].lower())) for r in rows]
    cw = [content(r["prompt"]) for r in rows]
    cross = 0
    for i, a in enumerate(rows):
        for k in range(i + 1, len(rows)):
            b = rows[k]
            if a["split"] == b["split"]:
                continue
            j = len(cw[i] & cw[k]) / max(1, len(cw[i] | cw[k]))
            if norm[i] == norm[k] or j >= 0.5:
                cross += 1
                errors.append(
                    f"prompt overlap across splits: {a['id']} ({a['split']}) ~ {b['id']} ({b['split']}), jaccard {j:.2f}"
                )
    dup_prompts = len(rows) - len(set(norm))
    if dup_prompts:
        errors.append(f"{dup_prompts} duplicate prompts")

    # ---- tables ----
    cats = sorted({r["category"] for r in rows})
    per = Counter((r["category"], r["split"]) for r in rows)
    body = [[c] + [per[(c, s)] for s in SPLITS] + [sum(per[(c, s)] for s in SPLITS)] for c in cats]
    body.append(["**total**"] + [sum(per[(c, s)] for c in cats) for s in SPLITS] + [len(rows)])
    print(f"## Rows per split and category ({len(rows)} prompts, {7 * len(rows)} responses)\n")
    print(table(["category"] + SPLITS + ["all"], body))

    groups: dict[str, list[int]] = defaultdict(list)
    groups_split: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        for x in r["responses"]:
            key = f"unsafe, severity {x['severity']}" if x["kind"] == "unsafe" else x["kind"]
            groups[key].append(words(x["text"]))
            groups_split[(key, r["split"])].append(words(x["text"]))
    order = [f"unsafe, severity {s}" for s in (1, 2, 3)] + KIND_ORDER[1:]
    sev_of = {"unsafe_hedged": 2, "refusal_curt": 0, "refusal_explained": 0, "safe_helpful": 0}
    help_of = {k: v[1] for k, v in SPEC.items()}
    body = []
    for k in order:
        n = groups[k]
        sev = k[-1] if k.startswith("unsafe,") else sev_of[k]
        hlp = 0 if k.startswith("unsafe,") else help_of[k]
        body.append(
            [k, sev, hlp, len(n), f"{mean(n):.1f}", min(n), max(n)]
            + [f"{mean(groups_split[(k, s)]):.1f}" for s in SPLITS]
        )
    print("\n## Words per response kind\n")
    print(
        table(
            ["kind", "severity", "helpfulness", "n", "mean words", "min", "max"]
            + [f"mean ({s})" for s in SPLITS],
            body,
        )
    )

    by_sev: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        for x in r["responses"]:
            by_sev[x["severity"]].append(words(x["text"]))
    print("\n## Words per severity (all kinds)\n")
    print(
        table(
            ["severity", "n", "mean words"],
            [[s, len(v), f"{mean(v):.1f}"] for s, v in sorted(by_sev.items())],
        )
    )

    bins = Counter()
    xs, ys = [], []
    for r in rows:
        for x in r["responses"]:
            if x["kind"] == "unsafe":
                bins[(x["severity"], length_bin(words(x["text"])))] += 1
                xs.append(x["severity"])
                ys.append(words(x["text"]))
    print("\n## Length bins of the graded unsafe answers (short <= 35 words < medium <= 75 < long)\n")
    print(
        table(
            ["severity", "short", "medium", "long"],
            [[s] + [bins[(s, b)] for b in ("short", "medium", "long")] for s in (1, 2, 3)],
        )
    )
    print(f"\nSpearman(words, severity) over the {len(xs)} graded unsafe answers: {spearman(xs, ys):+.3f}")
    lens = [{x["kind"]: words(x["text"]) for x in r["responses"]} for r in rows]
    both = [d for d in lens if "safe_helpful" in d and "refusal_explained" in d]
    longer = sum(1 for d in both if d["safe_helpful"] > d["refusal_explained"])
    print(f"safe_helpful longer than refusal_explained for the same prompt: {longer} of {len(both)} prompts")

    print("\n## Checks\n")
    print(f"- unique ids: {len(set(ids))} of {len(ids)}")
    print(f"- prompt pairs overlapping across splits: {cross}")
    if errors:
        print(f"- FAILED: {len(errors)} problem(s)")
        for e in errors:
            print(f"  - {e}")
        return 1
    print("- all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
