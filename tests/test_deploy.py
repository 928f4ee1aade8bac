"""Ship it, for real: the Docker image built and run on a local Docker engine, and the
Kubernetes manifests rendered (kustomization) and validated with kubernetes-validate.

Marked ``deploy``: ``make test-deploy`` runs these (CI does); they install and start dockerd
and build a local base image with debootstrap when the machine has none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port

pytestmark = pytest.mark.deploy

KUBERNETES = ROOT / "deploy" / "kubernetes"
SETUP = ROOT / "deploy" / "local-docker.sh"
BASE_IMAGE = "local/debian-py:bookworm"
IMAGE = "wasisup:test"


def render_kustomization(directory: Path) -> list[dict]:
    """What `kubectl kustomize` makes of deploy/kubernetes: resources, generated ConfigMaps,
    common labels (no kustomize binary is needed for these plain manifests)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = [doc for name in spec["resources"]
                 for doc in yaml.safe_load_all((directory / name).read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        documents.append({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
            "data": {Path(f).name: (directory / f).read_text() for f in generator["files"]},
        })
    for label in spec.get("labels", []):
        for doc in documents:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return documents


def test_kubernetes_manifests_validate(tmp_path):
    documents = render_kustomization(KUBERNETES)
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "Service"]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    validator = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run([str(validator), "--strict", str(rendered)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]["wasisup.conf.py"]
    graceful = int(next(line.split("=")[1].split("#")[0] for line in config.splitlines()
                        if line.startswith("graceful_timeout")))
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= graceful + pause
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"readinessProbe", "livenessProbe", "resources"} <= set(container)
    workers = next(e for e in container["env"] if e["name"] == "WEB_CONCURRENCY")
    assert workers["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"


@pytest.fixture(scope="module")
def image() -> str:
    """The wasisup image, built on a local base (the way README's Docker section says)."""
    subprocess.run(["bash", str(SETUP)], check=True, timeout=1800)
    subprocess.run(["docker", "build", "--network", "host", "-f", "deploy/Dockerfile",
                    "--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE, "."],
                   cwd=ROOT, check=True, timeout=1800)
    return IMAGE


def get(url: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(url, 2)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def docker_run(name: str, *args: str) -> None:
    """Start a detached container on host networking (the engine here has no bridge rules)."""
    started = subprocess.run(["docker", "run", "-d", "--name", name, "--network", "host", *args],
                             capture_output=True, text=True)
    assert started.returncode == 0, started.stderr


def test_container_serves_proxies_reports_and_drains(image, upstream):
    port, metrics_port = free_port(), free_port()
    name = f"wasisup-test-{port}"
    try:
        docker_run(name, "-e", f"UPSTREAM={upstream}", "-e",
                   f"WASISUP_CMD_ARGS=-b 127.0.0.1:{port} --metrics-bind 127.0.0.1:{metrics_port}",
                   image)
        wait_for(f"http://127.0.0.1:{port}/healthz")
        assert get(f"http://127.0.0.1:{port}/healthz")[::2] == (200, b"ok\n")
        status, headers, body = get(f"http://127.0.0.1:{port}/through/the/image?x=1")
        assert status == 200 and headers["x-wasisup-proxy"] == "1"
        assert json.loads(body)["path"] == "/through/the/image?x=1"
        metrics = get(f"http://127.0.0.1:{metrics_port}/metrics")[2].decode()
        assert "wasisup_requests_in_flight{pid=" in metrics
        user = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert user != "0"

        outcome: list = []
        slow = threading.Thread(target=lambda: outcome.append(
            get(f"http://127.0.0.1:{port}/slow?seconds=3", timeout=30)[0]))
        slow.start()
        time.sleep(1)
        stopped = subprocess.run(["docker", "stop", "-t", "35", name], capture_output=True)
        slow.join(30)
        assert stopped.returncode == 0 and outcome == [200]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_container_health_check_reports_healthy(image, upstream):
    port = free_port()
    name = f"wasisup-health-{port}"
    try:
        docker_run(name, "-e", f"WASISUP_CMD_ARGS=-b 127.0.0.1:{port}",
                   "-e", f"WASISUP_HEALTH_URL=http://127.0.0.1:{port}/healthz", image)
        deadline = time.monotonic() + 60
        status = ""
        while time.monotonic() < deadline and status != "healthy":
            status = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", name],
                                    capture_output=True, text=True).stdout.strip()
            time.sleep(1)
        assert status == "healthy"
        subprocess.run(["docker", "stop", "-t", "35", name], check=True, capture_output=True)
        exit_code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name],
                                   capture_output=True, text=True).stdout.strip()
        assert exit_code == "0"
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
