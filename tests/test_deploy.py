"""Ship it, for real: the Docker image built and run on a local Docker engine, and the
Kubernetes manifests rendered (kustomization) and validated with kubernetes-validate.

Marked ``deploy``: ``make test-deploy`` runs these (CI does); they install and start dockerd
and build a local base image with debootstrap when the machine has none.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, wait_until
from echo_upstream import EchoHandler  # (guest/, on the path conftest sets)

pytestmark = pytest.mark.deploy

KUBERNETES = ROOT / "deploy" / "kubernetes"
SETUP = ROOT / "deploy" / "local-docker.sh"
BASE_IMAGE = "local/debian-py:bookworm"
IMAGE = "wasisup:test"


def render_kustomization(directory: Path) -> list[dict]:
    """What `kubectl kustomize` makes of deploy/kubernetes (or an overlay of it): resources
    (files, or directories rendered in turn), strategic-merge patches, generated ConfigMaps,
    common labels (no kustomize binary is needed for these plain manifests)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents = []
    for name in spec["resources"]:
        if (directory / name).is_dir():
            documents += render_kustomization(directory / name)
        else:
            documents += [doc for doc in yaml.safe_load_all((directory / name).read_text()) if doc]
    for patch in spec.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        target = next(doc for doc in documents if doc["kind"] == change["kind"]
                      and doc["metadata"]["name"] == change["metadata"]["name"])
        merge(target, change)
    for generator in spec.get("configMapGenerator", []):
        documents.append({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
            "data": {Path(f).name: (directory / f).read_text() for f in generator["files"]},
        })
    for label in spec.get("labels", []):
        for doc in documents:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return documents


def merge(target: dict, change: dict) -> None:
    """A strategic merge, as far as these manifests need: maps merge, lists of named items
    merge by name, other lists are replaced."""
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif (isinstance(value, list) and isinstance(target.get(key), list)
              and all(isinstance(item, dict) and "name" in item for item in value)):
            for item in value:
                same = next((old for old in target[key] if old.get("name") == item["name"]), None)
                if same is None:
                    target[key].append(item)
                else:
                    merge(same, item)
        else:
            target[key] = value


def validate(documents: list[dict], tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    validator = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run([str(validator), "--strict", str(rendered)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_validate(tmp_path):
    documents = render_kustomization(KUBERNETES)
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "Service"]
    validate(documents, tmp_path)

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


def test_the_https_overlay_mounts_the_secret_it_names_and_probes_over_https(tmp_path):
    documents = render_kustomization(KUBERNETES / "tls")
    validate(documents, tmp_path)
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    secret = next(v for v in pod["volumes"] if "secret" in v)
    mount = next(m for m in container["volumeMounts"] if m["name"] == secret["name"])
    args = next(e for e in container["env"] if e["name"] == "WASISUP_CMD_ARGS")["value"].split()
    assert args == ["--certfile", f"{mount['mountPath']}/tls.crt",
                    "--keyfile", f"{mount['mountPath']}/tls.key"]  # a kubernetes.io/tls Secret's keys
    assert "subPath" not in mount  # (the kubelet updates no subPath mount when the Secret changes)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
    assert any(e["name"] == "UPSTREAM" for e in container["env"])  # the base's env is kept
    assert len([d for d in documents if d["kind"] == "Deployment"]) == 1


@pytest.fixture(scope="module")
def image() -> str:
    """The wasisup image, built on a local base (the way README's Docker section says)."""
    subprocess.run(["bash", str(SETUP)], check=True, timeout=1800)
    subprocess.run(["docker", "build", "--network", "host", "-f", "deploy/Dockerfile",
                    "--build-arg", f"BASE={BASE_IMAGE}", "-t", IMAGE, "."],
                   cwd=ROOT, check=True, timeout=1800)
    # The previous builds' images, and the build stage's, are left untagged: gone (with the vfs
    # storage driver every one is a full copy, and runs after runs fill the disk).
    subprocess.run(["docker", "image", "prune", "-f", "--filter",
                    "label=org.opencontainers.image.title=wasisup"], check=True, timeout=600,
                   capture_output=True)
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


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_container_health_check_reports_healthy(image, upstream, scheme, tmp_path):
    port = free_port()
    name = f"wasisup-health-{port}"
    args, mounts = f"-b 127.0.0.1:{port}", []
    if scheme == "https":  # a certificate the container's user can read, mounted read-only
        tmp_path.chmod(0o755)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                        str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt"), "-days", "1",
                        "-subj", "/CN=localhost"], check=True, capture_output=True)
        (tmp_path / "tls.key").chmod(0o644)
        args += " --certfile /etc/wasisup-tls/tls.crt --keyfile /etc/wasisup-tls/tls.key"
        mounts = ["-v", f"{tmp_path}:/etc/wasisup-tls:ro"]
    try:
        docker_run(name, *mounts, "-e", f"WASISUP_CMD_ARGS={args}",
                   "-e", f"WASISUP_HEALTH_URL={scheme}://127.0.0.1:{port}/healthz", image)
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


PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "wasisup.json"


def prometheus_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: apt-get install prometheus (.ci/run does)")
    return found


def test_the_prometheus_configuration_and_alert_rules_check(tmp_path):
    # Debian builds Prometheus without Kubernetes discovery: its promtool checks the rest.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["scrape_configs"] = [job for job in config["scrape_configs"]
                                if "kubernetes_sd_configs" not in job]
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    checkable = tmp_path / "prometheus.yml"
    checkable.write_text(yaml.safe_dump(config))
    promtool = prometheus_tool("promtool")
    for what, path in (("rules", PROMETHEUS / "alerts.yml"), ("config", checkable)):
        checked = subprocess.run([promtool, "check", what, str(path)], capture_output=True,
                                 text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


class _ClosingEcho(EchoHandler):
    """The echo upstream, one request a connection: once it stops, nothing pooled answers."""

    protocol_version = "HTTP/1.0"


def test_prometheus_scrapes_wasisup_and_answers_the_dashboard(serve, tmp_path):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _ClosingEcho)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    metrics_port, prometheus_port = free_port(), free_port()
    server = serve("proxy", "-w", "2", "--metrics-bind", f"127.0.0.1:{metrics_port}",
                   "--env", f"UPSTREAM=http://127.0.0.1:{upstream.server_address[1]}")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "scrape_configs": [{"job_name": "wasisup",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    prometheus = subprocess.Popen(
        [prometheus_tool("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{prometheus_port}/api/v1"

    def query(expr: str) -> list[dict]:
        url = f"{api}/query?{urllib.parse.urlencode({'query': expr})}"
        status, _, body = get(url)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            server.request("GET", "/slow?seconds=0.05")
            server.request("GET", "/?status=404")

    loaders = [threading.Thread(target=load) for _ in range(4)]
    try:
        wait_for(f"{api}/status/buildinfo")
        for thread in loaders:
            thread.start()
        per_worker = wait_until(lambda: query("wasisup_requests_in_flight"), timeout=60,
                                what="the in-flight series")
        assert len({series["metric"]["pid"] for series in per_worker}) == 2
        wait_until(lambda: {r["metric"]["code"] for r in query(
            "sum by (code) (rate(wasisup_requests_total[10s])) > 0")} >= {"200", "404"},
            what="request rates by code")
        p99 = query('histogram_quantile(0.99, sum by (le) '
                    '(rate(wasisup_outbound_request_duration_seconds_bucket{error=""}[10s])))')
        assert 0.05 <= float(p99[0]["value"][1]) <= 10
        for panel in json.loads(DASHBOARD.read_text())["panels"]:
            for target in panel["targets"]:
                query(target["expr"].replace("$__rate_interval", "10s"))

        upstream.shutdown()
        upstream.server_close()
        errors = wait_until(lambda: {r["metric"]["error"] for r in query(
            'sum by (error) (rate(wasisup_outbound_request_duration_seconds_count{error!=""}[10s]))'
            ' > 0')}, what="upstream errors by kind")
        assert errors == {"connection-refused"}
        groups = json.loads(get(f"{api}/rules")[2])["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) >= 7 and all(rule["health"] == "ok" for rule in rules), rules
    finally:
        stop.set()
        for thread in loaders:
            thread.join(30)
        prometheus.terminate()
        prometheus.wait(30)
