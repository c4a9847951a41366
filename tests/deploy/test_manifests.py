"""Offline validation of deploy/: compose config, Kubernetes schemas, yamllint, and
the properties the deployment promises (issue 6).

Runs without a Docker engine or a cluster:
- ``docker-compose -f deploy/docker-compose.yml config`` (Debian's docker-compose 1.29,
  or the ``docker compose`` plugin where that is installed) with a dummy env file;
- every manifest under deploy/k8s through ``kubernetes-validate`` (strict, pinned
  Kubernetes version, schemas shipped in the package);
- ``yamllint -c deploy/.yamllint deploy/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"

#: Kubernetes version the manifests are validated against (kubernetes-validate ships
#: the schemas offline); the oldest minor we claim to support.
K8S_VERSION = "1.33.0"

#: Values for every `${VAR:?...}` the compose file requires; never real secrets.
DUMMY_ENV = {
    "POSTGRES_PASSWORD": "dummy-postgres-password",
    "MINIO_ROOT_USER": "dummy-root",
    "MINIO_ROOT_PASSWORD": "dummy-root-password",
    "PROMPTSTORE_S3_ACCESS_KEY": "dummy-access-key",
    "PROMPTSTORE_S3_SECRET_KEY": "dummy-secret-key",
    "PROMPTSTORE_ADMIN_TOKEN": "dummy-admin-token-0123456789",
}

SPEC_RE = re.compile(r"^(open_clip|timm):[^:]+:.+$")


# ---------------------------------------------------------------- helpers


def _compose_cmd() -> list[str]:
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    msg = "neither docker-compose (Debian package) nor the docker compose plugin is installed; .ci/run installs it"
    if os.environ.get("PROMPTSTORE_TEST_ALLOW_SKIP") == "1":
        pytest.skip(msg)
    pytest.fail(msg + " (set PROMPTSTORE_TEST_ALLOW_SKIP=1 to skip these tests instead)", pytrace=False)


def _compose_config(tmp_path: Path, files: list[Path], env: dict[str, str]) -> subprocess.CompletedProcess:
    env_file = tmp_path / "dummy.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    args = [*_compose_cmd()]
    for f in files:
        args += ["-f", str(f)]
    args += ["--env-file", str(env_file), "config"]
    # A clean environment: only the env file supplies values (a developer's
    # exported secrets or deploy/.env must not make the test pass).
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(args, capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=120)


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _k8s(kind: str, name: str) -> dict:
    for _, doc in _k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} under deploy/k8s")


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compose")
    result = _compose_config(tmp, [COMPOSE], DUMMY_ENV)
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}\n{result.stdout}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def compose_gpu_config(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("compose-gpu")
    result = _compose_config(tmp, [COMPOSE, COMPOSE_GPU], DUMMY_ENV)
    assert result.returncode == 0, f"compose config (GPU override) failed:\n{result.stderr}\n{result.stdout}"
    return yaml.safe_load(result.stdout)


# ---------------------------------------------------------------- compose


def test_compose_requires_secrets(tmp_path):
    """`${VAR:?...}`: without the secrets compose refuses the file instead of using defaults."""
    for missing in DUMMY_ENV:
        env = {k: v for k, v in DUMMY_ENV.items() if k != missing}
        result = _compose_config(tmp_path, [COMPOSE], env)
        assert result.returncode != 0, f"compose config passed without {missing}"


def test_compose_services_and_order(compose_config):
    services = compose_config["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker"} <= set(services)
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == "service_healthy", name
    assert services["migrate"]["command"] == ["promptstore", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc" in services["minio-init"]["image"]
    assert "mc mb" in " ".join(services["minio-init"]["command"])
    assert services["api"]["command"] == ["promptstore", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert services["worker"]["command"] == ["promptstore", "worker"]
    assert any(str(p.get("target", p) if isinstance(p, dict) else p).endswith("8000") for p in services["api"]["ports"])


def test_compose_healthchecks_and_volumes(compose_config):
    services = compose_config["services"]
    for name in ("postgres", "redis", "minio", "api"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    mounts = {name: " ".join(str(v) for v in services[name].get("volumes", [])) for name in services}
    assert "postgres-data:" in mounts["postgres"]
    assert "minio-data:" in mounts["minio"]
    for name in ("api", "worker"):
        assert "model-cache:/cache" in mounts[name], f"{name} lacks the weight cache volume"
    assert set(compose_config["volumes"]) >= {"postgres-data", "minio-data", "model-cache"}


def test_compose_settings(compose_config):
    from store.settings import Settings

    known = {f"PROMPTSTORE_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "api", "worker"):
        env = compose_config["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("PROMPTSTORE_")} - known
        assert not unknown, f"{name}: settings the service does not read: {unknown}"
        assert SPEC_RE.match(env["PROMPTSTORE_BACKBONE"]), env["PROMPTSTORE_BACKBONE"]
        assert not env["PROMPTSTORE_BACKBONE"].split(":")[-1].startswith("random")
        assert env["PROMPTSTORE_ADMIN_TOKEN"] == DUMMY_ENV["PROMPTSTORE_ADMIN_TOKEN"]
        assert env["PROMPTSTORE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["PROMPTSTORE_OBJECT_STORE_URL"].startswith("s3://")
        assert env["PROMPTSTORE_BROKER_URL"].startswith("redis://")
        assert env["PROMPTSTORE_REDIS_URL"].startswith("redis://")


def test_compose_gpu_override(compose_gpu_config):
    services = compose_gpu_config["services"]
    for name in ("api", "worker"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert services[name]["environment"]["PROMPTSTORE_DEVICE"] == "cuda"
        assert services[name]["build"]["args"]["VARIANT"] == "cuda"
    assert "deploy" not in services["postgres"]


def test_env_example_covers_required_variables():
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    defined = {line.split("=", 1)[0] for line in lines if line and not line.startswith("#") and "=" in line}
    code = "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{(\w+):\?", code))
    assert required == set(DUMMY_ENV), "DUMMY_ENV is out of date with the compose file"
    assert required <= defined, f".env.example lacks {required - defined}"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=", text, re.M)
    assert re.search(r"^FROM .* AS base-cpu$", text, re.M) and re.search(r"^FROM .* AS base-cuda$", text, re.M)
    assert "FROM base-${VARIANT}" in text
    assert re.search(r"^FROM .*nvidia/cuda", text, re.M) or "nvidia/cuda:" in text
    assert re.search(r"^FROM runtime AS api$", text, re.M) and re.search(r"^FROM runtime AS worker$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(not u.startswith(("root", "0")) for u in users)
    assert re.search(r"^HEALTHCHECK .*\n.*healthz", text, re.M)
    assert 'VOLUME ["/cache"]' in text and "HF_HOME=/cache" in text
    # The torch pair is read from pyproject.toml, not pinned a second time: run the
    # very command the image runs and check it yields the pinned pair.
    (command,) = re.findall(r'python -c "(import tomllib;.*?)" > /tmp/torch-pins.txt', text)
    out = subprocess.run([sys.executable, "-c", command], cwd=REPO, capture_output=True, text=True, check=True)
    pins = out.stdout.split()
    assert sorted(p.split("==")[0] for p in pins) == ["torch", "torchvision"], pins
    assert not re.search(r"torch==\d", text), "torch pinned in the Dockerfile as well as pyproject.toml"


def test_image_install_ships_every_package_file(tmp_path):
    """The image runs a non-editable `pip install .` of what the Dockerfile copies: every
    file of the packages (model configs, templates, migrations, ...) must be in that install,
    not only in the source tree the tests run from."""
    import tomllib
    import zipfile

    text = (DEPLOY / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+) \./", text, re.M)
    allowed = {line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert set(copied) <= allowed, f"copied but excluded from the build context: {set(copied) - allowed}"
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(name.rstrip("*") for name in include)
    assert sorted(c for c in copied if (REPO / c).is_dir()) == packages, (copied, packages)

    ctx = tmp_path / "context"
    for name in copied:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            ctx.mkdir(exist_ok=True)
            shutil.copy2(src, ctx / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("promptstore-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())

    # The packages' files as git sees them (tracked or new, not ignored); outside a git
    # checkout, every file under them.
    git = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", *packages],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if git.returncode == 0:
        listed = git.stdout.split("\0")
    else:
        listed = [str(f.relative_to(REPO)) for name in packages for f in (REPO / name).rglob("*")]
    files = {f for f in listed if f and (REPO / f).is_file() and "__pycache__" not in f and not f.endswith(".pyc")}
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".ini") for f in files)
    missing = sorted(files - shipped)
    assert not missing, f"left out of the installed package (add them to package-data in pyproject.toml): {missing}"


# ---------------------------------------------------------------- Kubernetes


def test_k8s_schema_strict():
    import kubernetes_validate

    docs = _k8s_docs()
    assert docs, "no manifests under deploy/k8s"
    for path, doc in docs:
        if doc.get("kind") == "Kustomization":  # a kustomize file, not an API object
            for resource in doc["resources"]:
                assert (K8S / resource).is_file(), f"{path.name} lists missing {resource}"
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path_in_doc = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {path_in_doc}: {e.message}")


def test_k8s_schema_catches_mistakes():
    """Control: strict validation rejects an unknown field, so the test above means something."""
    import kubernetes_validate

    bad = _k8s("Deployment", "promptstore-api")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    _container(bad)["readinessProbes"] = _container(bad).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_yamllint():
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint"), "-f", "parsable", "--strict", str(DEPLOY)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["promptstore-api", "promptstore-worker"])
def test_k8s_deployments_request_gpus(name):
    dep = _k8s("Deployment", name)
    res = _container(dep)["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1"
    assert str(res["requests"]["nvidia.com/gpu"]) == "1"
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    env_from = {next(iter(ref.values()))["name"] for ref in _container(dep)["envFrom"]}
    assert env_from == {"promptstore-config", "promptstore-secrets"}


def test_k8s_api_probes_and_command():
    c = _container(_k8s("Deployment", "promptstore-api"))
    assert c["command"] == ["promptstore", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _container(_k8s("Deployment", "promptstore-worker"))["command"] == ["promptstore", "worker"]
    job = _k8s("Job", "promptstore-migrate")
    assert _container(job)["command"] == ["promptstore", "migrate"]


def test_k8s_references_resolve():
    """Services select the API pods; the ingresses point at Services and ports that exist."""
    api = _k8s("Deployment", "promptstore-api")
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in _container(api)["ports"]}
    services = {doc["metadata"]["name"]: doc for _, doc in _k8s_docs() if doc["kind"] == "Service"}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["metadata"]["name"]
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    for _, doc in _k8s_docs():
        if doc["kind"] != "Ingress":
            continue
        for rule in doc["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                backend = p["backend"]["service"]
                assert backend["name"] in services
                assert backend["port"]["name"] in {q["name"] for q in services[backend["name"]]["spec"]["ports"]}


def test_k8s_settings_keys():
    from store.settings import Settings

    known = {f"PROMPTSTORE_{name.upper()}" for name in Settings.model_fields}
    config = _k8s("ConfigMap", "promptstore-config")["data"]
    secret = _k8s("Secret", "promptstore-secrets")["stringData"]
    keys = {k for k in [*config, *secret] if k.startswith("PROMPTSTORE_")}
    assert keys <= known, f"settings the service does not read: {keys - known}"
    assert not set(config) & set(secret)
    for secret_key in ("PROMPTSTORE_DATABASE_URL", "PROMPTSTORE_ADMIN_TOKEN", "PROMPTSTORE_S3_SECRET_KEY"):
        assert secret_key in secret and secret_key not in config
    assert SPEC_RE.match(config["PROMPTSTORE_BACKBONE"])
    # The template's admin token is a placeholder the service refuses to start with.
    with pytest.raises(ValueError, match="placeholder"):
        Settings(database_url=secret["PROMPTSTORE_DATABASE_URL"], admin_token=secret["PROMPTSTORE_ADMIN_TOKEN"])


def _seconds(value: str | int) -> float:
    """Seconds from a Kubernetes integer or a compose duration such as '120s', '2m', '1m30s'."""
    if isinstance(value, int) or str(value).isdigit():
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), f"not a duration: {value!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def test_visibility_timeout_outlasts_a_warm_shutdown(compose_config):
    """A worker asked to stop finishes its job within its grace period; the broker must not
    hand that job to another worker meanwhile (PROMPTSTORE_BROKER_VISIBILITY_TIMEOUT)."""
    config = _k8s("ConfigMap", "promptstore-config")["data"]
    grace = _k8s("Deployment", "promptstore-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert _seconds(config["PROMPTSTORE_BROKER_VISIBILITY_TIMEOUT"]) > grace
    worker = compose_config["services"]["worker"]
    timeout = worker["environment"]["PROMPTSTORE_BROKER_VISIBILITY_TIMEOUT"]
    assert _seconds(timeout) > _seconds(worker["stop_grace_period"])


def test_k8s_ingress_hashes_classify_on_the_task():
    ing = _k8s("Ingress", "promptstore-classify")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$uri"
    assert ann["nginx.ingress.kubernetes.io/use-regex"] == "true"
    ((path,),) = [rule["http"]["paths"] for rule in ing["spec"]["rules"]]
    assert path["pathType"] == "ImplementationSpecific"
    # ingress-nginx anchors the path as `location ~* "^PATH"`.
    location = re.compile("^" + path["path"], re.I)
    task = "0f3c2a9e4b5d4c6e8a7b1c2d3e4f5a6b"
    assert location.match(f"/v1/tasks/{task}/classify")
    for other in (f"/v1/tasks/{task}", f"/v1/tasks/{task}/prompt", "/v1/tasks", f"/v1/tasks/{task}/classify/x"):
        assert not location.match(other), other
    # The hashed Service is its own upstream (ingress-nginx keeps one balancing
    # configuration per Service port); the catch-all goes elsewhere.
    catch_all = _k8s("Ingress", "promptstore")
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in catch_all["metadata"].get("annotations", {})
    hashed = path["backend"]["service"]["name"]
    others = {p["backend"]["service"]["name"] for r in catch_all["spec"]["rules"] for p in r["http"]["paths"]}
    assert hashed not in others


# ---------------------------------------------------------------- everywhere in deploy/


def _deploy_files() -> list[Path]:
    return [p for p in DEPLOY.rglob("*") if p.is_file() and p.name != ".env"]


def test_no_auto_backbone_anywhere():
    """docs/backbones.md: deploy files never use `auto` (nor random weights)."""
    auto = re.compile(r"BACKBONE\W{0,3}[:=]\s*[\"']?(auto|[\w-]+:[\w.-]+:random)\b", re.I)
    specs = re.compile(r"BACKBONE\W{0,3}[:=]\s*[\"']?([^\s\"'}]+)")
    seen = 0
    for path in _deploy_files():
        text = path.read_text()
        assert not auto.search(text), f"{path.relative_to(REPO)} uses an auto/random backbone"
        for spec in specs.findall(text):
            if spec.startswith("${"):  # compose default is checked through `config` above
                continue
            seen += 1
            assert SPEC_RE.match(spec), f"{path.relative_to(REPO)}: {spec!r} is not LIBRARY:ARCH:WEIGHTS"
    assert seen >= 2


def test_no_secrets_in_deploy():
    """Secrets come from the environment: no literal credentials in compose or manifests."""
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY|DATABASE_URL")
    checked = 0
    for path in (COMPOSE, COMPOSE_GPU):
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            for key, value in (service.get("environment") or {}).items():
                if secretish.search(key):
                    checked += 1
                    assert "${" in str(value), f"{path.name}: {name} sets {key} to a literal"
    assert checked >= 10
    for value in _k8s("Secret", "promptstore-secrets")["stringData"].values():
        assert "CHANGE_ME" in value or value == "changeme", f"secret template holds a real-looking value {value!r}"
