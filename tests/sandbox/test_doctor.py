"""``egresslock doctor`` run as a user runs it, and the feature checks behind it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from egresslock.sandbox.features import Feature, check_features
from tests.conftest import require_sandbox

REQUIRED = {"user-namespaces", "mount-namespace", "nftables-library", "nftables-in-namespace",
            "seccomp"}
OPTIONAL = {"landlock-net", "nflog", "bubblewrap", "curl"}
KEYS = {"name", "status", "ok", "required", "detail", "fix", "what_fails"}


def egresslock(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egresslock", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def require_all_required(features: list[Feature]) -> None:
    missing = [f"{f.name}: {f.detail}" for f in features if f.required and not f.ok]
    require_sandbox(not missing, f"sandbox features missing: {missing}")


def test_check_features_names_every_feature_and_is_fast() -> None:
    started = time.monotonic()
    features = check_features()
    elapsed = time.monotonic() - started
    assert {f.name for f in features if f.required} == REQUIRED
    assert {f.name for f in features if not f.required} == OPTIONAL
    assert elapsed < 0.2, f"check_features took {elapsed:.3f}s"
    for f in features:
        assert f.detail
        assert f.what_fails
        assert (f.fix == "") == f.ok, f  # a fix exactly when something is missing


def test_json_shape_and_required_features_ok_here() -> None:
    r = egresslock("doctor", "--json")
    report = json.loads(r.stdout)
    assert set(report) == {"ok", "features"}
    assert all(set(row) == KEYS for row in report["features"])
    assert {row["name"] for row in report["features"]} == REQUIRED | OPTIONAL
    for row in report["features"]:
        want = "ok" if row["ok"] else "MISSING" if row["required"] else "optional-missing"
        assert row["status"] == want
    assert r.returncode == (0 if report["ok"] else 1)
    require_all_required(check_features())
    assert report["ok"] is True
    assert r.returncode == 0, r.stderr


def test_text_output_names_fixes_for_what_is_missing() -> None:
    # Every fix the doctor knows, ready for a machine that lacks the feature.
    features = check_features()
    r = egresslock("doctor")
    assert r.returncode == (0 if all(f.ok for f in features if f.required) else 1)
    for f in features:
        assert f.name in r.stdout
        if not f.ok:
            assert f"fix:        {f.fix}" in r.stdout
            assert f"what fails: {f.what_fails}" in r.stdout
    require_all_required(features)
    assert "ready: every required feature works" in r.stdout


def test_seccomp_rules_listing() -> None:
    r = egresslock("doctor", "--json", "--seccomp-rules")
    rules = json.loads(r.stdout)["seccomp_rules"]
    assert any("AF_VSOCK" in line for line in rules)
    assert any(line.startswith("io_uring_setup -> EPERM") for line in rules)


def test_help_explains_statuses_and_exit_codes() -> None:
    r = egresslock("doctor", "--help")
    assert r.returncode == 0
    for words in ("optional-missing", "MISSING", "Exit 0", "--json"):
        assert words in r.stdout
