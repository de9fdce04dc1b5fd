"""Check rendered RBAC against the Kubernetes API calls the operator makes, in both directions.

A call the rules do not grant fails on a real cluster with 403; a rule no call needs is privilege
the operator should not hold. `check_rbac` reports both. Calls come from a declared list
(operator_calls.json) or from an API server's request record: `request_to_call` turns a recorded
HTTP request into the (verb, group, resource, subresource, namespace, name) the authorizer sees,
and `load_calls` reads either form from JSON.

    python3 tests/chart/rbac.py calls.json --rendered manifests.yaml \
        --service-account mailpoll/mailpoll
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs

import yaml

CLUSTER = None  # namespace of a cluster-wide request, and scope of a cluster-wide grant


@dataclass(frozen=True, order=True)
class ApiCall:
    """One request as the Kubernetes authorizer sees it."""

    verb: str
    api_group: str
    resource: str
    subresource: str = ""
    # None: a request not confined to one namespace (a cluster-wide list or watch, or a
    # cluster-scoped object).
    namespace: str | None = None
    # The object's name, when the request names one (get, update, patch, delete; not create,
    # list or watch).
    name: str | None = None

    @property
    def resource_path(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def describe(self) -> str:
        group = self.api_group or "core"
        where = f"namespace {self.namespace}" if self.namespace is not None else "all namespaces"
        named = f" {self.name}" if self.name else ""
        return f"{self.verb} {group}/{self.resource_path}{named} in {where}"

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> ApiCall:
        """A call from its JSON form: either the authorizer's attributes or an HTTP request."""
        if "method" in item:
            return request_to_call(item["method"], item["path"], item.get("query", ""))
        unknown = set(item) - {
            "verb", "apiGroup", "resource", "subresource", "namespace", "name",
        }
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in call {item}")
        return cls(
            verb=item["verb"],
            api_group=item.get("apiGroup", ""),
            resource=item["resource"],
            subresource=item.get("subresource", "") or "",
            namespace=item.get("namespace") or None,
            name=item.get("name") or None,
        )


def load_calls(path: str | Path, substitutions: dict[str, list[str | None]] | None = None) -> list[ApiCall]:
    """Reads calls from a JSON file: a list, or an object with a "calls" list.

    Each item is either {"verb", "apiGroup", "resource", "subresource"?, "namespace"?, "name"?}
    or a recorded HTTP request {"method", "path", "query"?}. In the first form a namespace or
    name written as "${key}" expands to every value of `substitutions[key]` (None meaning all
    namespaces), so one declared list serves every values set.
    """
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    items = document["calls"] if isinstance(document, dict) else document
    calls: list[ApiCall] = []
    for item in items:
        for expanded in _expand(item, substitutions or {}):
            calls.append(ApiCall.from_json(expanded))
    return calls


def _expand(item: dict[str, Any], substitutions: dict[str, list[str | None]]) -> Iterable[dict[str, Any]]:
    for key in ("namespace", "name"):
        value = item.get(key)
        if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
            placeholder = value[2:-1]
            if placeholder not in substitutions:
                raise KeyError(f"no substitution for {value} in call {item}")
            for replacement in substitutions[placeholder]:
                yield from _expand({**item, key: replacement}, substitutions)
            return
    yield item


# Verbs the authorizer derives from the HTTP method, for requests that name an object.
_NAMED_VERBS = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete", "POST": "create"}


def request_to_call(method: str, path: str, query: str = "") -> ApiCall:
    """The authorizer's view of an HTTP request, as kube-apiserver's RequestInfo resolves it.

    /api/v1/namespaces/ns/secrets/name          -> get "" secrets in ns, name
    /apis/g/v/namespaces/ns/things?watch=true   -> watch g things in ns
    /apis/g/v/things                            -> list g things in all namespaces
    /apis/g/v/namespaces/ns/things/x/status     -> patch g things/status in ns, name x
    """
    path, _, inline_query = path.partition("?")
    query = query or inline_query
    parts = [part for part in path.split("/") if part]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        raise ValueError(f"not a resource request: {method} {path}")
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace = rest[1]
        rest = rest[2:]
        if not rest:
            # A request on the Namespace object itself.
            rest = ["namespaces", namespace]
            namespace = None
    if not rest:
        raise ValueError(f"not a resource request: {method} {path}")
    resource = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) >= 3 else ""
    method = method.upper()
    params = parse_qs(query)
    watching = params.get("watch", ["false"])[0] in ("true", "1")
    if name is None:
        verbs = {"GET": "watch" if watching else "list", "POST": "create", "DELETE": "deletecollection"}
        if method not in verbs:
            raise ValueError(f"unexpected {method} on a collection: {path}")
        verb = verbs[method]
    else:
        if method not in _NAMED_VERBS:
            raise ValueError(f"unexpected method {method}: {path}")
        verb = "watch" if method == "GET" and watching else _NAMED_VERBS[method]
    return ApiCall(verb, group, resource, subresource, namespace, name)


@dataclass(frozen=True)
class Grant:
    """One (verb, group, resource) allowed by a rule, in a scope (a namespace, or the cluster)."""

    scope: str | None
    verb: str
    api_group: str
    resource_path: str
    resource_names: frozenset[str]
    source: str

    def allows(self, call: ApiCall) -> bool:
        if self.scope is not CLUSTER and call.namespace != self.scope:
            return False
        if (self.verb, self.api_group, self.resource_path) != (call.verb, call.api_group, call.resource_path):
            return False
        # A rule limited to names never matches an unnamed request (create, list, watch).
        return not self.resource_names or (call.name is not None and call.name in self.resource_names)

    def describe(self) -> str:
        group = self.api_group or "core"
        where = f"namespace {self.scope}" if self.scope is not CLUSTER else "all namespaces"
        names = f" {sorted(self.resource_names)}" if self.resource_names else ""
        return f"{self.verb} {group}/{self.resource_path}{names} in {where} (from {self.source})"


def effective_grants(manifests: list[dict[str, Any]], service_account: tuple[str, str]) -> tuple[list[Grant], list[str]]:
    """Every grant the ServiceAccount holds through the rendered bindings, and any problems
    (wildcards, bindings to roles that were not rendered)."""
    sa_namespace, sa_name = service_account
    problems: list[str] = []
    roles = {
        (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc
        for doc in manifests
        if doc.get("kind") in ("Role", "ClusterRole")
    }
    grants: list[Grant] = []
    for binding in manifests:
        kind = binding.get("kind")
        if kind not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            subject.get("kind") == "ServiceAccount"
            and subject.get("name") == sa_name
            and subject.get("namespace") == sa_namespace
            for subject in binding.get("subjects") or []
        ):
            continue
        binding_namespace = binding["metadata"].get("namespace") if kind == "RoleBinding" else None
        ref = binding["roleRef"]
        role_namespace = binding_namespace if ref["kind"] == "Role" else None
        role = roles.get((ref["kind"], role_namespace, ref["name"]))
        source = f"{kind} {binding['metadata']['name']} -> {ref['kind']} {ref['name']}"
        if role is None:
            problems.append(f"{source}: the {ref['kind']} is not in the rendered chart")
            continue
        # A ClusterRole bound by a RoleBinding grants only inside the binding's namespace.
        scope = binding_namespace if kind == "RoleBinding" else CLUSTER
        for rule in role.get("rules") or []:
            if rule.get("nonResourceURLs"):
                problems.append(f"{source}: non-resource URLs {rule['nonResourceURLs']} are never called")
                continue
            names = frozenset(rule.get("resourceNames") or [])
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        if "*" in (group, resource, verb):
                            problems.append(f"{source}: wildcard in {rule} grants more than the operator calls")
                            continue
                        grants.append(Grant(scope, verb, group, resource, names, source))
    return grants, problems


def check_rbac(calls: Iterable[ApiCall], manifests: list[dict[str, Any]], service_account: tuple[str, str]) -> list[str]:
    """Problems with the rendered RBAC for these calls: calls not granted, grants never used,
    wildcards, dangling bindings. Empty when the rules are exactly what the calls need."""
    calls = sorted(set(calls))
    grants, problems = effective_grants(manifests, service_account)
    for call in calls:
        if not any(grant.allows(call) for grant in grants):
            problems.append(f"not granted: {call.describe()}")
    for grant in grants:
        if not any(grant.allows(call) for call in calls):
            problems.append(f"granted but never called: {grant.describe()}")
    return problems


def assert_rbac_exact(calls: Iterable[ApiCall], manifests: list[dict[str, Any]], service_account: tuple[str, str]) -> None:
    problems = check_rbac(calls, manifests, service_account)
    if problems:
        raise AssertionError("RBAC does not match the operator's API calls:\n  " + "\n  ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", help="JSON file of calls (see load_calls)")
    parser.add_argument("--rendered", required=True, help="rendered chart manifests (multi-document YAML)")
    parser.add_argument("--service-account", required=True, metavar="NAMESPACE/NAME")
    args = parser.parse_args(argv)
    manifests = [doc for doc in yaml.safe_load_all(Path(args.rendered).read_text(encoding="utf-8")) if doc]
    namespace, _, name = args.service_account.partition("/")
    problems = check_rbac(load_calls(args.calls), manifests, (namespace, name))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
