"""Check the deployment files against the real schemas, offline: `python infra/check_manifests.py`.

* KubeRay objects (RayCluster, RayJob): KubeRay's own CRD schema (infra/schemas/kuberay-v1.2,
  vendored), with the Kubernetes core/v1 types it embeds (pod templates, env, resources) from
  Kubernetes' own JSON schema (the `kubernetes-validate` package), both strict: an unknown field
  is an error, as the API server's strict field validation (`kubectl apply`'s default) makes it.
* Other Kubernetes objects (the ServiceAccount): Kubernetes' schema, strict.
* The Ray cluster launcher YAML: Ray's own `ray-schema.json` and config checks (the installed
  wheel's `prepare_config` + `validate_config`), and each AWS `node_config` against the EC2
  RunInstances request that Ray sends it as (botocore's service model).
* What is checked is what `kubectl apply -k` would send: each overlay rendered by kustomize
  (`kubectl kustomize`, needs kubectl) as well as the base.

Exit 0: all valid; 1: problems (printed, one per line, naming the file, object and field).
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent
KUBERAY_SCHEMA = INFRA / "schemas" / "kuberay-v1.2" / "rayjob-v1.openAPIV3Schema.yaml"
KUBERNETES_VERSION = "1.30.0"  # the core/v1 API that the vendored CRD was generated against
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
KUSTOMIZE_ROOTS = [INFRA / "kuberay" / "base", *sorted((INFRA / "kuberay" / "overlays").iterdir())]
LAUNCHER_FILES = sorted((INFRA / "ray-cluster").glob("*.yaml"))


def strict(schema):
    """The schema with `additionalProperties: false` on every object that lists its fields:
    the API server prunes (or, under strict field validation, rejects) unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def _kubernetes_registry():
    """Kubernetes' strict core schemas (kubernetes-validate) as a `referencing` registry."""
    import json
    from importlib import resources

    from referencing import Registry, Resource

    root = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    definitions = json.loads((root / "_definitions.json").read_text())
    return root, Resource.from_contents(definitions) @ Registry()


@functools.cache
def kuberay_schemas() -> dict[str, dict]:
    """{kind: JSON schema} for RayJob and RayCluster (whose spec is RayJob's rayClusterSpec)."""
    rayjob = strict(yaml.safe_load(KUBERAY_SCHEMA.read_text()))
    top = rayjob["properties"]
    raycluster = {"type": "object", "additionalProperties": False,
                  "properties": {"apiVersion": top["apiVersion"], "kind": top["kind"], "metadata": top["metadata"],
                                 "spec": top["spec"]["properties"]["rayClusterSpec"]}}
    return {"RayJob": rayjob, "RayCluster": raycluster}


def _validator(schema: dict):
    import jsonschema

    _, registry = _kubernetes_registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _kubernetes_schema(doc: dict) -> dict:
    """Kubernetes' own schema of a built-in kind (core/v1 and group/version kinds)."""
    import json

    root, _ = _kubernetes_registry()
    group_version = doc.get("apiVersion", "")
    group, _, version = group_version.rpartition("/")
    name = f"{doc.get('kind', '').lower()}-{group.split('.')[0] + '-' if group else ''}{version}.json"
    path = root / name
    if not path.is_file():
        raise ValueError(f"no Kubernetes {KUBERNETES_VERSION} schema for {doc.get('kind')} {group_version}")
    return json.loads(path.read_text())


def manifest_problems(doc: dict, where: str) -> list[str]:
    """Every schema violation of one Kubernetes object, as 'where kind/name: field: reason'."""
    kind = doc.get("kind")
    name = f"{kind}/{(doc.get('metadata') or {}).get('name')}"
    if kind in ("RayCluster", "RayJob"):
        if doc.get("apiVersion") != "ray.io/v1":
            return [f"{where} {name}: apiVersion {doc.get('apiVersion')!r}, the vendored CRD is ray.io/v1"]
        schema = kuberay_schemas()[kind]
    else:
        try:
            schema = _kubernetes_schema(doc)
        except ValueError as exc:
            return [f"{where} {name}: {exc}"]
    errors = sorted(_validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{where} {name}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(root: Path) -> list[dict]:
    """What `kubectl apply -k root` sends: the kustomization rendered by kubectl's kustomize."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError("kubectl is not installed: it renders the kustomizations (kubectl kustomize)")
    done = subprocess.run([exe, "kustomize", str(root)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {root}: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


def launcher_problems(config: dict, where: str) -> list[str]:
    """Ray's own checks of a cluster-launcher config (its schema, with its defaults filled in),
    and each AWS node_config against EC2's RunInstances request (unknown keys, wrong nesting)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError) as exc:
        message = exc.message if isinstance(exc, jsonschema.ValidationError) else str(exc)
        path = ".".join(map(str, getattr(exc, "absolute_path", []))) or "(top)"
        return [f"{where}: {path}: {message}"]
    if config.get("provider", {}).get("type") != "aws":
        return []
    import botocore.session

    request = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    return [f"{where}: available_node_types.{name}.node_config{problem}"
            for name, node in config.get("available_node_types", {}).items()
            for problem in _shape_problems(node.get("node_config", {}), request, "")]


def _shape_problems(value, shape, path: str) -> list[str]:
    if shape.type_name == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping ({shape.name})"]
        return [p for k, v in value.items()
                for p in ([f"{path}.{k}: not a field of EC2 {shape.name}"] if k not in shape.members
                          else _shape_problems(v, shape.members[k], f"{path}.{k}"))]
    if shape.type_name == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in _shape_problems(v, shape.member, f"{path}[{i}]")]
    return []


def all_problems() -> list[str]:
    problems = []
    for root in KUSTOMIZE_ROOTS:
        docs = render(root)
        problems += [p for d in docs for p in manifest_problems(d, str(root.relative_to(INFRA.parent)))]
    for path in LAUNCHER_FILES:
        problems += launcher_problems(yaml.safe_load(path.read_text()), str(path.relative_to(INFRA.parent)))
    return problems


def main() -> int:
    try:
        problems = all_problems()
    except RuntimeError as exc:
        print(f"check_manifests: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    checked = [str(p.relative_to(INFRA.parent)) for p in [*KUSTOMIZE_ROOTS, *LAUNCHER_FILES]]
    print(("NOT VALID: " if problems else "valid: ") + ", ".join(checked))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
