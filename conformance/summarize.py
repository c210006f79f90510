"""Summarize a peer-suite result folder (JUnit XML per test file) as Markdown.

usage: python summarize.py RESULT_DIR

Prints the per-file table (passed / failed / errored / skipped / xfailed),
the failures grouped by reason, and the skips grouped by reason.
"""

import collections
import os
import re
import sys
import xml.etree.ElementTree as ET

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
HEXID = re.compile(r"\b[0-9a-f]{16,}\b", re.I)
ADDR = re.compile(r"0x[0-9a-f]+", re.I)
NUM = re.compile(r"(?<![A-Za-z_])\d+(\.\d+)?")

# (coarse category, regex on the failure text); first match wins
CATEGORIES = [
    ("per-test timeout hit (test hung)", re.compile(r"Failed: Timeout")),
    (
        "result never arrived (celery TimeoutError from .get())",
        re.compile(r"celery\.exceptions\.TimeoutError|TimeoutError: The operation timed out"),
    ),
    ("backend lacks a feature (NotImplementedError)", re.compile(r"NotImplementedError")),
    ("chord failed (ChordError)", re.compile(r"ChordError")),
    (
        "database error",
        re.compile(r"django\.db\.|psycopg|IntegrityError|OperationalError|DataError"),
    ),
    ("wrong result / state (AssertionError)", re.compile(r"AssertionError|^assert |\bassert\b")),
]


def normalize(msg):
    msg = (msg or "").strip().splitlines()[0] if (msg or "").strip() else ""
    msg = UUID.sub("<id>", msg)
    msg = HEXID.sub("<id>", msg)
    msg = ADDR.sub("<addr>", msg)
    msg = NUM.sub("<n>", msg)
    return msg[:160]


SEVERITY = {"skipped": 0, "xfailed": 1, "passed": 2, "xpassed": 2, "errored": 3, "failed": 4}


def outcome(tc):
    kinds = {child.tag: child for child in tc}
    props = {p.get("name"): p.get("value") for p in tc.iter("property")}
    if "failure" in kinds and (props.get("peersuite_outcome") or "").startswith("xpassed"):
        # tagged by peersuite_plugin: an xfail(raises=TimeoutError) test whose
        # result did arrive
        node = ET.Element("failure", message="[XPASS: " + props["peersuite_outcome"][9:] + "]")
        return "xpassed", node
    if "failure" in kinds:
        # xfail_strict=true (Celery's pyproject) turns an unexpected pass into a
        # failure; for scoring a backend it is a pass, counted apart.
        if (kinds["failure"].get("message") or "").startswith("[XPASS(strict)]"):
            return "xpassed", kinds["failure"]
        return "failed", kinds["failure"]
    if "error" in kinds:
        return "errored", kinds["error"]
    if "skipped" in kinds:
        sk = kinds["skipped"]
        if (sk.get("type") or "") == "pytest.xfail":
            return "xfailed", sk
        return "skipped", sk
    return "passed", None


LOG_LINE = re.compile(
    r"^(?P<id>\S*::.*?) (?P<out>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS|SUBFAIL|SUBPASS)"
    r"(?: \(.*\))? +\[ *\d+%\]$"
)
COLLECTED = re.compile(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?")


def log_selected(log_text):
    """Number of tests pytest selected, from the -v log ('collected N items ...')."""
    m = COLLECTED.search(log_text)
    if not m:
        return None
    if m.group(3):
        return int(m.group(3))
    return int(m.group(1)) - int(m.group(2) or 0)


def outcomes_from_log(log_text):
    """Fallback when a session died before writing its JUnit XML: the -v lines."""
    rank = {"passed": 0, "xpassed": 0, "skipped": 1, "xfailed": 1, "failed": 3, "errored": 3}
    # non-strict XPASS counts as passed, as in the JUnit XML
    names = {
        "PASSED": "passed",
        "XPASS": "passed",
        "SKIPPED": "skipped",
        "XFAIL": "xfailed",
        "FAILED": "failed",
        "ERROR": "errored",
        "SUBFAIL": "failed",
    }
    seen = {}
    for line in log_text.splitlines():
        m = LOG_LINE.match(line.strip())
        if not m or m.group("out") == "SUBPASS":
            continue
        test_id, out = m.group("id"), names[m.group("out")]
        if m.group("out") == "SUBFAIL" and test_id.endswith("]"):
            test_id = test_id[: test_id.rfind(" [")] if " [" in test_id else test_id
        test_id = test_id.split("t/integration/", 1)[-1].replace(".py::", "::")
        if test_id not in seen or rank[out] > rank[seen[test_id]]:
            seen[test_id] = out
    return seen


def category(text):
    for name, rx in CATEGORIES:
        if rx.search(text):
            return name
    first = (text or "").strip().splitlines()
    return "other: " + (first[0][:80] if first else "?")


def _read(path):
    """The text of ``path``, or "" when it does not exist."""
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()


def main(out):
    timings = {}
    tpath = os.path.join(out, "timings.tsv")
    if os.path.exists(tpath):
        for line in _read(tpath).splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                timings[os.path.basename(parts[0])[:-3]] = (parts[1], parts[2])
    meta = _read(os.path.join(out, "meta.txt"))

    rows, failures, skips = [], [], []
    names = sorted(
        {n[:-4] for n in os.listdir(out) if n.endswith(".xml")} | set(timings),
        key=lambda n: list(timings).index(n) if n in timings else 999,
    )
    totals = collections.Counter()
    for name in names:
        counts = collections.Counter()
        xml = os.path.join(out, name + ".xml")
        logp = os.path.join(out, name + ".log")
        log_text = _read(logp)
        if not os.path.exists(xml) and log_text:
            for test_id, kind in outcomes_from_log(log_text).items():
                counts[kind] += 1
                if kind in ("failed", "errored"):
                    failures.append(
                        (name, test_id, kind, "unknown (session died; see the log)", "?", 0.0)
                    )
                elif kind in ("skipped", "xfailed", "xpassed"):
                    skips.append((name, test_id, kind, "(from log)"))
        if os.path.exists(xml):
            root = ET.parse(xml).getroot()
            # pytest writes a second <testcase> for a teardown error after a
            # failed call: keep one entry per test, the worst outcome
            worst = {}
            for tc in root.iter("testcase"):
                kind, node = outcome(tc)
                test_id = f"{tc.get('classname', '')}::{tc.get('name', '')}"
                test_id = test_id.replace("t.integration.", "")
                if test_id not in worst or SEVERITY[kind] > SEVERITY[worst[test_id][0]]:
                    worst[test_id] = (kind, node, tc)
            for test_id, (kind, node, tc) in worst.items():
                counts[kind] += 1
                if kind in ("failed", "errored"):
                    text = (node.get("message") or "") + "\n" + (node.text or "")
                    failures.append(
                        (
                            name,
                            test_id,
                            kind,
                            category(text),
                            normalize(node.get("message")),
                            float(tc.get("time") or 0),
                        )
                    )
                elif kind in ("skipped", "xfailed", "xpassed"):
                    skips.append((name, test_id, kind, normalize(node.get("message"))))
        rc, secs = timings.get(name, ("?", "?"))
        selected = log_selected(log_text)
        if selected is not None and selected > sum(counts.values()):
            counts["not run"] = selected - sum(counts.values())
        collected = sum(counts.values())
        note = (
            "" if os.path.exists(xml) else " (no JUnit XML: session killed; outcomes from the log)"
        )
        if "session-timeout" in log_text:
            note += " (stopped by PEER_SUITE_FILE_TIMEOUT)"
        rows.append((name, collected, counts, secs, rc, note))
        totals.update(counts)

    print("## Per file\n")
    print(
        "| file | tests | passed | failed | errored | skipped | xfailed | xpassed | not run"
        " | wall s | pytest rc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total_secs = 0
    for name, collected, c, secs, rc, note in rows:
        total_secs += int(secs) if str(secs).isdigit() else 0
        print(
            f"| {name}.py{note} | {collected} | {c['passed']} | {c['failed']} | {c['errored']} | "
            f"{c['skipped']} | {c['xfailed']} | {c['xpassed']} | {c['not run']} | {secs} | {rc} |"
        )
    print(
        f"| **total** | {sum(totals.values())} | {totals['passed']} | {totals['failed']} | "
        f"{totals['errored']} | {totals['skipped']} | {totals['xfailed']} | "
        f"{totals['xpassed']} | {totals['not run']} | {total_secs} | |"
    )
    good = totals["passed"] + totals["xpassed"]
    ran = good + totals["failed"] + totals["errored"] + totals["not run"]
    if ran:
        print(
            f"\nScore: (passed + xpassed) / (passed + xpassed + failed + errored + not run) = "
            f"{good}/{ran} = {100.0 * good / ran:.1f}%  "
            f"(skipped and xfailed tests are left out; 'xpassed' = marked xfail by Celery "
            f"but passed, which Celery's xfail_strict reports as a failure)"
        )

    print("\n## Failures and errors by category\n")
    if not failures:
        print("none")
    else:
        cats = collections.Counter(f[3] for f in failures)
        print("| category | count |")
        print("|---|---:|")
        for cat, n in cats.most_common():
            print(f"| {cat} | {n} |")
        print("\n## Failures and errors by message\n")
        msgs = collections.defaultdict(list)
        for f in failures:
            msgs[f[4]].append(f)
        print("| count | message (normalized first line) | tests |")
        print("|---:|---|---|")
        for msg, fs in sorted(msgs.items(), key=lambda kv: -len(kv[1])):
            tests = ", ".join(sorted({t[1].split("::")[-1] for t in fs}))
            print(f"| {len(fs)} | `{msg.replace('|', '/')}` | {tests.replace('|', '/')} |")
        print("\n## Every failing test\n")
        print("| file | test | outcome | s | category |")
        print("|---|---|---|---:|---|")
        for name, test_id, kind, cat, _msg, secs in failures:
            print(f"| {name} | {test_id} | {kind} | {secs:.1f} | {cat} |")

    print("\n## Skips, xfails and xpasses by reason\n")
    if not skips:
        print("none")
    else:
        reasons = collections.Counter((s[0], s[2], s[3]) for s in skips)
        print("| file | kind | count | reason |")
        print("|---|---|---:|---|")
        for (name, kind, msg), n in sorted(reasons.items(), key=lambda kv: (kv[0][0], -kv[1])):
            print(f"| {name} | {kind} | {n} | {msg.replace('|', '/')} |")
    if meta:
        print("\n## Run\n")
        print("```")
        print(meta.strip())
        print("```")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
