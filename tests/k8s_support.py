"""Shared pieces of the Kubernetes tests: tiny run configs, YAML reading, the Pod Security and QoS rules."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = REPO / "k8s" / "crds"  # the pinned JobSet and Kueue CRDs
IMAGE = "registry.example.com/ml/titan-moe:0.1.0"
TOKENIZER_DIR = "/models/olmoe-tokenizer"  # a folder the cluster's image would hold


def crd_path() -> Path:
    return CRD_DIR


def run_toml(
    *,
    num_experts: int = 8,
    moe: bool = True,
    steps: int = 4,
    checkpoint: str = "",
    **parallelism: int,
) -> str:
    """A tiny synthetic-data run config; ``parallelism`` keys are torchtitan's [parallelism] names.

    Synthetic tokens have no tokenizer: ``hf_assets_path`` names where the cluster's
    eval Job would find one (render refuses a run whose eval Job could not).
    """
    lines = [
        "[model]",
        'name = "titan_moe"',
        f'hf_assets_path = "{TOKENIZER_DIR}"',
        "[arch]",
        "dim = 32",
        "n_layers = 2",
        "n_heads = 4",
        "ffn_hidden = 64",
        "vocab_size = 256",
        "[moe]",
        f"enabled = {'true' if moe else 'false'}",
        f'expert_sets = [ {{ num_experts = {num_experts}, granularity = "1/4", top_k = 2 }} ]',
        'generalist_granularity = "1/2"',
        "require_flop_match = true",
        "[training]",
        'dataset = "synthetic"',
        "seq_len = 16",
        "local_batch_size = 2",
        f"steps = {steps}",
        "[parallelism]",
        *(f"{k} = {v}" for k, v in parallelism.items()),
    ]
    if checkpoint:
        lines += ["[checkpoint]", checkpoint]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, name: str = "tiny-moe", **kwargs) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(run_toml(**kwargs))
    return path


def load(path: Path) -> dict:
    (obj,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return obj


def trainer_pod(jobset: dict) -> dict:
    (rjob,) = jobset["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]["spec"]


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template in a Deployment, Job or JobSet."""
    kind = obj["kind"]
    if kind == "JobSet":
        rjobs = obj["spec"]["replicatedJobs"]
        return [(f"JobSet/{r['name']}", r["template"]["spec"]["template"]["spec"]) for r in rjobs]
    if kind in ("Job", "Deployment"):
        return [(kind, obj["spec"]["template"]["spec"])]
    return []


# The Pod Security Standards, "baseline" and "restricted" levels (Kubernetes v1.33
# docs, "Pod Security Standards"), as checks on a pod spec.  Baseline: no host
# namespaces/paths/ports, no privileged containers, capabilities only from the
# default set.  Restricted adds: only the listed volume types, runAsNonRoot,
# no root uid, seccomp RuntimeDefault/Localhost, allowPrivilegeEscalation false,
# capabilities drop ALL and add at most NET_BIND_SERVICE.
_BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                  "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """Every rule of the "restricted" profile the pod spec breaks (empty: it passes)."""
    out = []
    sc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"spec.{field}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    if sc.get("sysctls"):
        out.append("spec.securityContext.sysctls")
    containers = pod.get("initContainers", []) + pod["containers"]
    for c in containers:
        csc = c.get("securityContext", {})
        where = f"container {c['name']}"
        if csc.get("privileged"):
            out.append(f"{where}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where}: capabilities must drop ALL")
        for cap in caps.get("add", []):
            if cap != "NET_BIND_SERVICE":
                note = "" if cap in _BASELINE_CAPS else " (not even baseline)"
                out.append(f"{where}: adds capability {cap}{note}")
        if csc.get("procMount", "Default") != "Default":
            out.append(f"{where}: procMount")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{where}: hostPort")
        if not (csc.get("runAsNonRoot", sc.get("runAsNonRoot")) is True):
            out.append(f"{where}: runAsNonRoot must be true")
        if csc.get("runAsUser", sc.get("runAsUser")) == 0:
            out.append(f"{where}: runs as uid 0")
        seccomp = csc.get("seccompProfile", sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
    if sc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser is 0")
    return out


def qos_class(pod: dict) -> str:
    """The QoS class the kubelet would give the pod (Kubernetes' GetPodQOS, requests defaulting to limits)."""
    guaranteed, any_set = True, False
    for c in pod.get("initContainers", []) + pod["containers"]:
        res = c.get("resources", {})
        limits, requests = res.get("limits", {}), {**res.get("limits", {}), **res.get("requests", {})}
        for r in ("cpu", "memory"):
            any_set = any_set or r in requests or r in limits
            if r not in limits or requests.get(r) != limits[r]:
                guaranteed = False
    return "Guaranteed" if guaranteed else "Burstable" if any_set else "BestEffort"


# -- failure policies, evaluated the way the controllers do --------------------------------
# The Job controller (pkg/controller/job/pod_failure_policy.go, Kubernetes 1.31+): the rules
# in order, the first match decides.  onExitCodes looks at terminated containers (the named
# one, or any) with a non-zero code, operator In / NotIn; onPodConditions at the pod's
# conditions.  FailJob fails the Job with reason PodFailurePolicy and the message below;
# Ignore leaves the failure uncounted; Count or no matching rule counts it against
# backoffLimit (exceeded: reason BackoffLimitExceeded).


def pod_failure(policy: dict, pod_name: str, exit_code: int, conditions: tuple[str, ...] = (),
                container: str = "trainer", namespace: str = "titan-moe") -> tuple[str, str | None]:
    """(action, FailJob message) of a Job's ``podFailurePolicy`` for a pod whose one container exited."""
    for index, rule in enumerate(policy["rules"]):
        action = rule["action"]
        on_codes = rule.get("onExitCodes")
        if on_codes is not None:
            if on_codes.get("containerName", container) != container or exit_code == 0:
                continue
            hit = exit_code in on_codes["values"]
            if hit != (on_codes["operator"] == "In"):
                continue
            message = (f"Container {container} for pod {namespace}/{pod_name} failed with exit code "
                       f"{exit_code} matching {action} rule at index {index}")
            return action, message if action == "FailJob" else None
        wanted = {c["type"] for c in rule.get("onPodConditions", []) if c.get("status", "True") == "True"}
        for condition in conditions:
            if condition in wanted:
                message = f"Pod {namespace}/{pod_name} has condition {condition} matching {action} rule at index {index}"
                return action, message if action == "FailJob" else None
    return "Count", None


def job_failure(job_spec: dict, pod_name: str, exit_code: int,
                conditions: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(reason, message) of the Job's Failed condition after this one pod failed; None if the Job lives on."""
    action, message = pod_failure(job_spec["podFailurePolicy"], pod_name, exit_code, conditions)
    if action == "FailJob":
        assert message is not None
        return "PodFailurePolicy", message
    if action == "Count" and 1 > job_spec.get("backoffLimit", 6):
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


def jobset_action(failure_policy: dict, reason: str, message: str) -> str:
    """The JobSet controller's action for a failed Job: the first rule whose reason and message match."""
    for rule in failure_policy.get("rules", []):
        reasons, patterns = rule.get("onJobFailureReasons", []), rule.get("onJobFailureMessagePatterns", [])
        if reasons and reason not in reasons:
            continue
        # Go's regexp.MatchString: an unanchored search (RE2 syntax; these patterns are plain text).
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        return rule["action"]
    return "RestartJobSet"
