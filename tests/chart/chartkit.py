"""Rendering the chart with the real Helm engine (helm-python-sdk) and reading the result."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "mailpoll"
CRD_FILE = REPO_ROOT / "crds" / "mailboxpoll.yaml"
CHART_CRD_COPY = CHART_DIR / "files" / "mailboxpoll-crd.yaml"

RELEASE = "mp"
NAMESPACE = "mailpoll-system"
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
)
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


@dataclass
class Rendered:
    """One render: the manifests as parsed objects, plus NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    raw: dict[str, str]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [obj for obj in self.of_kind(kind) if name is None or obj["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


def load_chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render(values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE, **options: Any) -> Rendered:
    with load_chart() as chart:
        raw = chart.render(values or {}, name=RELEASE, namespace=namespace, **options)
    objects: list[dict[str, Any]] = []
    notes = ""
    for template, text in raw.items():
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for document in yaml.safe_load_all(text):
            if document is None:
                continue
            assert isinstance(document, dict), f"{template} rendered a non-object document: {document!r}"
            objects.append(document)
    return Rendered(objects, notes, raw)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env: dict[str, dict[str, Any]] = {}
    for variable in container.get("env") or []:
        assert variable["name"] not in env, f"env {variable['name']} set twice in {container['name']}"
        env[variable["name"]] = variable
    return env


# `.Values.a.b` and `$.Values.a.b`; a trailing method call or index is not part of the path.
_VALUE_REFERENCE = re.compile(r"\$?\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def value_references() -> dict[str, set[str]]:
    """Every `.Values` path the templates mention, with the templates that mention it."""
    references: dict[str, set[str]] = {}
    for template in sorted((CHART_DIR / "templates").rglob("*")):
        if not template.is_file():
            continue
        for match in _VALUE_REFERENCE.finditer(template.read_text(encoding="utf-8")):
            references.setdefault(match.group(1).lstrip("."), set()).add(template.name)
    return references
