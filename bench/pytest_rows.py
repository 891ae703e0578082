"""A pytest plugin that appends one CSV row per test as soon as the test ends, so a run
stopped at its time limit keeps every result it finished (a JUnit XML is written only
at the end). bench/gpu_session.sh loads it for the gpu-marked tests:

    python -m pytest -p bench.pytest_rows --rows-csv OUT/gpu_tests.csv -m gpu

Columns: nodeid, outcome (passed / failed / skipped / error), phase (setup / call /
teardown: where a failure or skip happened), seconds (the call's duration), message
(the skip reason or the last line of the failure, at most 300 characters), and the
UTC time of the row.
"""
from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path

COLUMNS = ["nodeid", "outcome", "phase", "seconds", "message", "timestamp"]


def pytest_addoption(parser):
    parser.addoption("--rows-csv", default=None,
                     help="append one CSV row per test to this file as each test ends")


class RowWriter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        self.writer.writeheader()
        self.file.flush()
        self.failed_in: dict = {}

    def pytest_runtest_logreport(self, report):
        outcome = None
        if report.when == "call":
            outcome = report.outcome
        elif report.outcome in ("failed", "skipped"):       # setup / teardown
            outcome = "error" if report.outcome == "failed" else "skipped"
        if outcome is None:
            return
        message = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            message = str(report.longrepr[2])
        elif report.outcome == "failed":
            message = str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""
        self.writer.writerow({"nodeid": report.nodeid, "outcome": outcome, "phase": report.when,
                              "seconds": f"{report.duration:.3f}", "message": message[:300],
                              "timestamp": _dt.datetime.now(_dt.timezone.utc)
                              .isoformat(timespec="seconds")})
        self.file.flush()

    def pytest_unconfigure(self, config):
        self.file.close()


def pytest_configure(config):
    path = config.getoption("--rows-csv")
    if path:
        config.pluginmanager.register(RowWriter(Path(path)), "anita_rows_csv")
