"""Offline validation of rendered manifests (no API server needed).

* Built-in kinds: the ``kubernetes-validate`` package's bundled OpenAPI
  schemas, strict mode (unknown fields are errors).
* Custom resources (JobSet, Kueue's ResourceFlavor / ClusterQueue /
  LocalQueue): the CRD's own ``openAPIV3Schema`` -- from the pinned CRDs in
  ``k8s/crds/`` -- checked with ``jsonschema``, made strict the way the API
  server prunes: every object schema that lists its ``properties`` rejects
  other keys, so a typo such as ``restartStratgy`` fails here instead of being
  silently dropped by the cluster.  A custom resource's metadata, and a
  JobSet's Job templates, are additionally checked against the built-in
  ObjectMeta and batch/v1 Job schemas.

Needs the dev dependencies (``jsonschema``, ``kubernetes-validate``).
CEL rules (``x-kubernetes-validations``) and webhooks are not evaluated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

# The Kubernetes release the manifests target: podFailurePolicy (with onExitCodes)
# and the DisruptionTarget pod condition are GA since 1.31, backoffLimitPerIndex
# since 1.33; JobSet needs >= 1.29.
KUBERNETES_VERSION = "1.33.0"
# The pinned CRDs (k8s/README.md says which releases) ship with the repository.
CRD_DIR = Path(__file__).resolve().parents[2] / "k8s" / "crds"


@dataclass(frozen=True)
class Problem:
    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path or '<root>'}: {self.message}"


def _strict(node: object) -> object:
    """Copy of an OpenAPI v3 schema where listed properties are the only allowed ones."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (_strict(v) if k != "properties" else {p: _strict(s) for p, s in v.items()}) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=8)
def crd_schemas(crd_dir: str) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON schema, for every served version of every CRD in ``crd_dir``."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for v in doc["spec"]["versions"]:
                if v.get("served", True):
                    schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
                    schemas[(f"{group}/{v['name']}", kind)] = _strict(schema)
    if not schemas:
        raise ValueError(f"no CustomResourceDefinition in {crd_dir}")
    return schemas


def _json_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path)


def _validate_builtin(obj: dict, file: str, version: str, prefix: str = "") -> list[Problem]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [Problem(file, f"{prefix}{path}", exc.message)]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [Problem(file, "", exc.message)]
    return []


def validate_object(obj: dict, file: str, crd_dir: str | Path = CRD_DIR,
                    version: str = KUBERNETES_VERSION) -> list[Problem]:
    """All schema problems of one object (empty list when it validates)."""
    schema = crd_schemas(str(crd_dir)).get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is None:
        return _validate_builtin(obj, file, version)
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    problems = [Problem(file, _json_path(e), e.message) for e in validator.iter_errors(obj)]
    # CRDs leave metadata open (the API server checks it as ObjectMeta).
    meta_probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    problems += _validate_builtin(meta_probe, file, version)
    if obj.get("kind") == "JobSet":
        for i, rjob in enumerate(obj.get("spec", {}).get("replicatedJobs", [])):
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"{obj['metadata'].get('name', 'x')}-{rjob.get('name', i)}-0"},
                "spec": rjob.get("template", {}).get("spec", {}),
            }
            problems += _validate_builtin(job, file, version, prefix=f"spec.replicatedJobs.{i}.template.")
    return problems


def validate_dir(
    out_dir: str | Path, crd_dir: str | Path = CRD_DIR, version: str = KUBERNETES_VERSION
) -> tuple[int, list[Problem]]:
    """Validate every YAML object under ``out_dir``; return (objects checked, problems)."""
    out_dir = Path(out_dir)
    checked, problems = 0, []
    for path in sorted(out_dir.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if not obj:
                continue
            if obj.get("kind") == "Kustomization":
                for res in obj.get("resources", []):
                    if not (out_dir / res).is_file():
                        problems.append(Problem(path.name, "resources", f"{res} does not exist"))
                checked += 1
                continue
            problems += validate_object(obj, path.name, crd_dir, version)
            checked += 1
    return checked, problems
