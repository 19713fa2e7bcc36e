"""Offline validation of rendered manifests (no API server needed).

* Built-in kinds: the ``kubernetes-validate`` package's bundled OpenAPI
  schemas, strict mode (unknown fields are errors).
* JobSet: the CRD's own ``openAPIV3Schema`` checked with ``jsonschema``,
  made strict the way the API server prunes: every object schema that lists
  its ``properties`` rejects other keys, so a typo such as ``restartStratgy``
  fails here instead of being silently dropped by the cluster.  The JobSet's
  metadata and its Job template are additionally checked against the
  built-in ObjectMeta and batch/v1 Job schemas.

Needs the dev dependencies (``jsonschema``, ``kubernetes-validate``).
CEL rules (``x-kubernetes-validations``) and webhooks are not evaluated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

# Oldest Kubernetes release the manifests target: podFailurePolicy and the
# DisruptionTarget pod condition are GA since 1.31; JobSet needs >= 1.29.
KUBERNETES_VERSION = "1.33.0"
JOBSET_VERSION = "v1alpha2"


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


@lru_cache(maxsize=4)
def jobset_schema(crd_path: str, version: str = JOBSET_VERSION) -> dict:
    """The strict JSON schema of one JobSet API version, read from the CRD file."""
    for doc in yaml.safe_load_all(Path(crd_path).read_text()):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        for v in doc["spec"]["versions"]:
            if v["name"] == version:
                return _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))  # type: ignore[return-value]
    raise ValueError(f"{crd_path} has no CustomResourceDefinition with version {version}")


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


def validate_object(obj: dict, file: str, crd_path: str | Path, version: str = KUBERNETES_VERSION) -> list[Problem]:
    """All schema problems of one object (empty list when it validates)."""
    if obj.get("kind") == "JobSet":
        import jsonschema

        if obj.get("apiVersion") != f"jobset.x-k8s.io/{JOBSET_VERSION}":
            return [Problem(file, "apiVersion", f"expected jobset.x-k8s.io/{JOBSET_VERSION}")]
        validator = jsonschema.Draft7Validator(jobset_schema(str(crd_path)))
        problems = [Problem(file, _json_path(e), e.message) for e in validator.iter_errors(obj)]
        # The CRD leaves metadata open (the API server checks it as ObjectMeta).
        meta_probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
        problems += _validate_builtin(meta_probe, file, version)
        for i, rjob in enumerate(obj.get("spec", {}).get("replicatedJobs", [])):
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"{obj['metadata'].get('name', 'x')}-{rjob.get('name', i)}-0"},
                "spec": rjob.get("template", {}).get("spec", {}),
            }
            problems += _validate_builtin(job, file, version, prefix=f"spec.replicatedJobs.{i}.template.")
        return problems
    return _validate_builtin(obj, file, version)


def validate_dir(
    out_dir: str | Path, crd_path: str | Path, version: str = KUBERNETES_VERSION
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
            problems += validate_object(obj, path.name, crd_path, version)
            checked += 1
    return checked, problems
