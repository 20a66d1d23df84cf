#!/usr/bin/env python3
"""Audit the locked dependencies for known vulnerabilities (CI runs this in `make test`).

Exports the exact versions pinned in uv.lock (every distribution and extra of the workspace,
the workspace's own packages left out) and runs pip-audit on them against PyPI's advisory
data (the OSV-backed `vulnerabilities` of PyPI's JSON API). Exit 0 when no pinned version has
a known vulnerability, 1 when one has (each listed with its advisory ids and fixed versions),
2 when the audit itself could not run (no network to PyPI, pip-audit missing).

An advisory that does not apply to us can be accepted in `scripts/audit-ignore.txt`: one id
per line followed by the reason (`GHSA-xxxx-xxxx-xxxx  only affects the CLI we never call`).

    .venv/bin/python scripts/audit_deps.py [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UV = ROOT / ".tools" / "bin" / "uv"
IGNORE_FILE = ROOT / "scripts" / "audit-ignore.txt"
PIP_AUDIT = "pip-audit==2.10.1"  # pinned: the CI result must not change with the tool


def ignored_ids(path: Path = IGNORE_FILE) -> dict[str, str]:
    """Accepted advisory ids -> reason, from the ignore file (blank lines and # comments skipped)."""
    if not path.exists():
        return {}
    accepted: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            vuln_id, _, reason = line.partition(" ")
            accepted[vuln_id] = reason.strip()
    return accepted


def findings(report: dict[str, Any], accepted: dict[str, str]) -> dict[str, Any]:
    """Summarise pip-audit's JSON report: packages audited and the vulnerable ones, with the
    accepted advisories moved aside."""
    vulnerable, waived = [], []
    for dep in report.get("dependencies", []):
        for vuln in dep.get("vulns") or []:
            ids = [vuln["id"], *vuln.get("aliases", [])]
            entry = {
                "name": dep["name"],
                "version": dep["version"],
                "id": vuln["id"],
                "fix_versions": vuln.get("fix_versions", []),
            }
            (waived if any(i in accepted for i in ids) else vulnerable).append(entry)
    return {
        "packages": len(report.get("dependencies", [])),
        "vulnerable": vulnerable,
        "accepted": waived,
    }


def run_audit() -> dict[str, Any]:
    """Export the lock and pip-audit it; {"ok": False, "error": ...} when it cannot run."""
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        exported = subprocess.run(
            [str(UV), "export", "--frozen", "--all-packages", "--all-extras"]
            + ["--no-emit-workspace", "--no-hashes", "--quiet", "-o", str(requirements)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if exported.returncode != 0:
            return {"ok": False, "error": f"uv export failed: {exported.stderr.strip()[-500:]}"}
        for _attempt in range(2):  # one retry: a dropped connection to PyPI is not a finding
            result = subprocess.run(
                [str(UV), "tool", "run", "--quiet", "--from", PIP_AUDIT, "pip-audit"]
                + ["--no-deps", "--disable-pip", "--progress-spinner", "off"]
                + ["-r", str(requirements), "--format", "json"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            try:
                report = json.loads(result.stdout)
            except ValueError:
                continue
            return {"ok": True, **findings(report, ignored_ids())}
    error = (result.stderr or result.stdout).strip()[-500:]
    return {"ok": False, "error": f"pip-audit could not run: {error}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run_audit()
    if args.json:
        print(json.dumps(result, indent=1))
    elif not result["ok"]:
        print(f"dependency audit: {result['error']}", file=sys.stderr)
        print("It needs PyPI reachable (the same access `make env` needs).", file=sys.stderr)
    else:
        for v in result["vulnerable"]:
            fix = ", ".join(v["fix_versions"]) or "no fixed version yet"
            print(f"VULNERABLE {v['name']} {v['version']}: {v['id']} (fixed in: {fix})")
        for v in result["accepted"]:
            print(f"accepted   {v['name']} {v['version']}: {v['id']} (scripts/audit-ignore.txt)")
        print(
            f"dependency audit: {result['packages']} locked packages, "
            f"{len(result['vulnerable'])} known vulnerabilities"
        )
        if result["vulnerable"]:
            print(
                "Upgrade them (.tools/bin/uv lock --upgrade-package NAME), or accept an advisory "
                "that does not apply in scripts/audit-ignore.txt with the reason.",
                file=sys.stderr,
            )
    if not result["ok"]:
        return 2
    return 1 if result["vulnerable"] else 0


if __name__ == "__main__":
    sys.exit(main())
