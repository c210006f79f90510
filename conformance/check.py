"""Fail unless every Celery test that ran passed, but for the documented expected failures.

usage: python check.py RESULT_DIR EXPECTED_FAILURES_FILE

Reads the JUnit XML and log files ``run.sh`` leaves in RESULT_DIR (one per test file). A
test that failed or errored fails the check unless EXPECTED_FAILURES_FILE lists it; so does
a file whose session died or stopped before its last test. An expected failure that passed
is reported, so that the list can shrink.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET

from summarize import log_selected, outcome


def expected(path: str) -> set[str]:
    names = set()
    with open(path) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(line.split()[0])
    return names


def results(folder: str) -> tuple[dict[str, str], list[str]]:
    """``file.py::class::test`` -> outcome for every test case of every file's JUnit XML,
    and the problems of files whose session died or stopped before its last test."""
    found, problems = {}, []
    for log_name in sorted(n for n in os.listdir(folder) if n.endswith(".log")):
        name = log_name[:-4]
        xml = os.path.join(folder, name + ".xml")
        if not os.path.exists(xml):
            problems.append(f"{name}.py: no JUnit XML (the session died; see {log_name})")
            continue
        cases = list(ET.parse(xml).getroot().iter("testcase"))
        for case in cases:
            classname = case.get("classname", "").rsplit(".", 1)[-1]
            found[f"{name}.py::{classname}::{case.get('name')}"] = outcome(case)[0]
        with open(os.path.join(folder, log_name), errors="replace") as handle:
            selected = log_selected(handle.read())
        if selected is not None and selected > len(cases):
            problems.append(f"{name}.py: {selected - len(cases)} selected tests never ran")
    return found, problems


def main(folder: str, expected_path: str) -> int:
    allowed = expected(expected_path)
    outcomes, problems = results(folder)
    if not outcomes:
        problems.append(f"no test results in {folder}")
    bad = sorted(t for t, kind in outcomes.items() if kind in ("failed", "errored"))
    unexpected = [t for t in bad if t not in allowed]
    healed = sorted(t for t in allowed if outcomes.get(t) in ("passed", "xpassed"))
    counts: dict[str, int] = {}
    for kind in outcomes.values():
        counts[kind] = counts.get(kind, 0) + 1
    print("conformance: " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
    for test_id in healed:
        print(f"conformance: expected failure now passes (remove it from the list): {test_id}")
    for test_id in unexpected:
        print(f"conformance: FAILED {test_id}", file=sys.stderr)
    for problem in problems:
        print(f"conformance: {problem}", file=sys.stderr)
    return 1 if unexpected or problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
