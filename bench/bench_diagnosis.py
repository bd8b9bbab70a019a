"""Diagnosis figures on the corpus of real failure outputs (tests/data/failures/).

For each case, the output is read as `runnerctl exec` reads a command's stderr
(runnerd_client.tracebacks.command_ending) and the record diagnosed (runnerd.diagnosis).
Prints, per expected category, how many cases got the right category, the right
retryable flag and the right class; then the cost of reading and diagnosing. Not a test:
it asserts nothing, it reports. Pass another folder of cases in the same format to see how
the rules do on outputs they were not written from.

    python bench/bench_diagnosis.py [--corpus DIR] [--misses]
"""

from __future__ import annotations

import argparse
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runnerd.diagnosis import diagnose
from runnerd_client.tracebacks import command_ending

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "failures"


@dataclass(frozen=True)
class Case:
    name: str
    failure_class: str
    category: str
    retryable: bool
    returncode: int
    output: str


def load(path: Path) -> Case:
    head, output = path.read_text(encoding="utf-8").split("\n----\n", 1)
    fields = dict(line.split(": ", 1) for line in head.splitlines())
    ending = fields["exit"]
    code = -signal.Signals[ending] if ending.startswith("SIG") else int(ending)
    return Case(
        path.stem, fields["class"], fields["category"], fields["retryable"] == "yes", code, output
    )


def record_of(case: Case) -> dict[str, Any]:
    ending = command_ending(case.output, case.returncode)
    return {
        "failure_class": ending.failure_class,
        "message": ending.message,
        "traceback": ending.traceback,
        "reason": "crash",
        "exit_code": case.returncode,
        "signal": ending.signal,
    }


def accuracy(cases: list[Case], misses: bool) -> None:
    totals: Counter[str] = Counter()
    right: dict[str, Counter[str]] = defaultdict(Counter)
    wrong: list[str] = []
    for case in cases:
        record = record_of(case)
        found = diagnose(record)
        scores = {
            "category": found.category == case.category,
            "retryable": found.retryable == case.retryable,
            "class": record["failure_class"] == case.failure_class,
        }
        totals[case.category] += 1
        for what, ok in scores.items():
            right[case.category][what] += ok
        if not all(scores.values()):
            wrong.append(
                f"  {case.name}: {record['failure_class']} -> {found.category} "
                f"(retryable={found.retryable}) [{found.pattern}]"
            )
    print(f"{'CATEGORY':<14}{'CASES':>6}{'CATEGORY OK':>13}{'RETRYABLE OK':>14}{'CLASS OK':>10}")
    for category in sorted(totals):
        got = right[category]
        print(
            f"{category:<14}{totals[category]:>6}{got['category']:>13}"
            f"{got['retryable']:>14}{got['class']:>10}"
        )
    n = sum(totals.values())
    share = {
        what: sum(r[what] for r in right.values()) / n
        for what in ("category", "retryable", "class")
    }
    print(
        f"{'all':<14}{n:>6}{share['category']:>12.1%}{share['retryable']:>14.1%}"
        f"{share['class']:>10.1%}"
    )
    if misses and wrong:
        print("misses:", *wrong, sep="\n")


def speed(cases: list[Case], rounds: int = 20) -> None:
    records = [record_of(case) for case in cases]
    size = sum(len(case.output.encode()) for case in cases)
    start = time.perf_counter()
    for _ in range(rounds):
        for case in cases:
            command_ending(case.output, case.returncode)
    read = (time.perf_counter() - start) / (rounds * len(cases))
    start = time.perf_counter()
    for _ in range(rounds):
        for record in records:
            diagnose(record)
    judged = (time.perf_counter() - start) / (rounds * len(records))
    big = "\n".join(case.output for case in cases) * 8  # a long stderr tail, read whole
    start = time.perf_counter()
    command_ending(big, 1)
    long_read = time.perf_counter() - start
    print(f"\nreading an output: {read * 1e3:.2f} ms on average ({size / len(cases):.0f} B)")
    print(f"diagnosing a record (its traceback re-read): {judged * 1e3:.2f} ms on average")
    print(
        f"reading a {min(len(big.encode()), 64 * 1024) / 1024:.0f} KiB tail: "
        f"{long_read * 1e3:.1f} ms"
    )
    for name, text in (
        ("4,600 exception lines", "ValueError: x\n" * 4600),
        ("32,768 dotted words", "a." * 32768),
    ):
        record = {
            "failure_class": "ExitCode",
            "message": "exit code 1",
            "traceback": text,
            "reason": "crash",
            "exit_code": 1,
        }
        start = time.perf_counter()
        diagnose(record)
        print(f"diagnosing a 64 KiB tail of {name}: {(time.perf_counter() - start) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--misses", action="store_true", help="list the cases got wrong")
    args = parser.parse_args()
    cases = [load(path) for path in sorted(args.corpus.glob("*.txt"))]
    print(f"{len(cases)} cases from {args.corpus}\n")
    accuracy(cases, args.misses)
    speed(cases)


if __name__ == "__main__":
    main()
