"""The dependency audit CI runs (scripts/audit_deps.py): how it reads pip-audit's report and
the accepted-advisories file. The audit itself runs in `make test` against PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("audit_deps", ROOT / "scripts" / "audit_deps.py")
audit_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit_deps)

REPORT = {
    "dependencies": [
        {
            "name": "aiohttp",
            "version": "3.9.0",
            "vulns": [
                {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2024-1"], "fix_versions": ["3.9.2"]},
                {"id": "PYSEC-2024-9", "aliases": [], "fix_versions": []},
            ],
        },
        {"name": "numpy", "version": "2.3.0", "vulns": []},
        {"name": "local-thing", "skip_reason": "not on PyPI"},
    ]
}


def test_findings_lists_each_vulnerable_pin_with_its_fix():
    result = audit_deps.findings(REPORT, accepted={})
    assert result["packages"] == 3 and result["accepted"] == []
    assert result["vulnerable"] == [
        {
            "name": "aiohttp",
            "version": "3.9.0",
            "id": "GHSA-aaaa-bbbb-cccc",
            "fix_versions": ["3.9.2"],
        },
        {"name": "aiohttp", "version": "3.9.0", "id": "PYSEC-2024-9", "fix_versions": []},
    ]


def test_an_accepted_advisory_is_set_aside_by_its_id_or_an_alias(tmp_path):
    ignore = tmp_path / "audit-ignore.txt"
    ignore.write_text("# comment\n\nCVE-2024-1  only the client we never use  # why\n")
    accepted = audit_deps.ignored_ids(ignore)
    assert accepted == {"CVE-2024-1": "only the client we never use"}
    result = audit_deps.findings(REPORT, accepted)
    assert [v["id"] for v in result["accepted"]] == ["GHSA-aaaa-bbbb-cccc"]
    assert [v["id"] for v in result["vulnerable"]] == ["PYSEC-2024-9"]


def test_the_shipped_ignore_file_accepts_nothing():
    assert audit_deps.ignored_ids() == {}
    assert audit_deps.ignored_ids(ROOT / "missing.txt") == {}


def test_ci_runs_the_audit():
    makefile = (ROOT / "Makefile").read_text()
    assert "test: env lint audit" in makefile
    assert "scripts/audit_deps.py" in makefile
