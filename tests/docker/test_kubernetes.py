"""The Kubernetes manifests, offline (no cluster, no engine): they validate strictly against
the API's schemas, and agree with the image and the program: the key is a file the program
is told about, /data is the claim, one run at a time, the image's uid, a grace period that
outlasts a drain, and options and variables the program has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.config import Config
from ingest.ops import check_compose as cc

MANIFESTS = Path(__file__).resolve().parents[2] / "docker" / "kubernetes"
VALIDATOR = Path(sys.executable).parent / "kubernetes-validate"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MANIFESTS / name).read_text())
    return doc


def pod_specs() -> dict[str, dict[str, Any]]:
    return {
        "job": load("job-first-load.yaml")["spec"]["template"]["spec"],
        "cronjob": load("cronjob-topup.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    }


def validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VALIDATOR), "--strict", *map(str, paths)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_every_manifest_validates_strictly() -> None:
    paths = sorted(MANIFESTS.glob("*.yaml"))
    assert {p.name for p in paths} == {"cronjob-topup.yaml", "job-first-load.yaml", "pvc.yaml", "secret.yaml"}
    result = validate(*paths)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(paths)


def test_the_validator_refuses_a_field_kubernetes_does_not_have(tmp_path: Path) -> None:
    broken = load("cronjob-topup.yaml")
    broken["spec"]["concurencyPolicy"] = broken["spec"].pop("concurrencyPolicy")
    path = tmp_path / "cronjob.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = validate(path)
    assert result.returncode != 0
    assert "concurencyPolicy" in result.stdout + result.stderr


def test_one_run_per_data_directory() -> None:
    cron = load("cronjob-topup.yaml")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert load("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("kind", ["job", "cronjob"])
def test_the_pod_agrees_with_the_image_and_the_program(kind: str) -> None:
    spec = pod_specs()[kind]
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert cc.environment_problems(env) == []
    assert cc.cli_problems(container.get("args", [])) == []

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == load("pvc.yaml")["metadata"]["name"]
    assert mounts["data"] == "/data", "the image's INGEST_DATA_DIR"
    secret = volumes["api-key"]["secret"]
    assert secret["secretName"] == load("secret.yaml")["metadata"]["name"]
    (key,) = load("secret.yaml")["stringData"]
    assert env["DATASYNC_API_KEY_FILE"] == f"{mounts['api-key']}/{key}"
    assert "DATASYNC_API_KEY" not in env

    security = spec["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (10001, 10001, 10001)
    assert spec["terminationGracePeriodSeconds"] >= Config().request_timeout + 30
    requests_ = container["resources"]["requests"]
    assert re.fullmatch(r"\d+Mi", requests_["memory"]) and "memory" in container["resources"]["limits"]


def test_job_and_cronjob_run_the_same_pod() -> None:
    """One pod spec in two files: a change to one must be made to the other."""
    specs = pod_specs()
    assert specs["job"] == specs["cronjob"]
