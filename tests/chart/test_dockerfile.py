"""The operator image recipe: multi-stage, locked release build, binary only, non-root.

No image can be built here, so the Dockerfile is read and its shape checked against what the
chart expects of the image.
"""

from __future__ import annotations

import json

import yaml

from chartkit import CHART_DIR, REPO_ROOT


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, argument = line.partition(" ")
        result.append((instruction.upper(), " ".join(argument.split())))
    return result


def global_args() -> dict[str, str]:
    """The ARGs before the first FROM (the base image choices) with their defaults."""
    args = {}
    for instruction, argument in instructions():
        if instruction == "FROM":
            break
        name, _, default = argument.partition("=")
        args[name] = default
    return args


def stages() -> list[list[tuple[str, str]]]:
    """The instructions grouped by stage, base image ARGs substituted in FROM."""
    base = global_args()
    result: list[list[tuple[str, str]]] = []
    for instruction, argument in instructions():
        if instruction == "FROM":
            for name, value in base.items():
                argument = argument.replace("${" + name + "}", value)
            result.append([])
        if result:
            result[-1].append((instruction, argument))
    return result


def test_the_builder_compiles_a_locked_release_build() -> None:
    builder, _ = stages()
    assert builder[0] == ("FROM", "rust:1.95.0-bookworm AS builder"), "an exact toolchain release"
    runs = [argument for instruction, argument in builder if instruction == "RUN"]
    assert any("cargo build --release --locked" in run for run in runs), runs


def test_the_runtime_image_holds_only_the_binary_and_runs_as_non_root() -> None:
    _, runtime = stages()
    assert runtime[0] == ("FROM", "gcr.io/distroless/cc-debian12:nonroot")
    kinds = [instruction for instruction, _ in runtime]
    assert "RUN" not in kinds, "the runtime stage must not run anything (no shell there)"
    copies = [argument for instruction, argument in runtime if instruction in ("COPY", "ADD")]
    assert copies == ["--from=builder /out/mailpoll /usr/local/bin/mailpoll"]
    user = dict(runtime)["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root id (runAsNonRoot checks it)"
    assert json.loads(dict(runtime)["ENTRYPOINT"]) == ["/usr/local/bin/mailpoll"]
    # The chart runs the image as the same user.
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    assert values["podSecurityContext"]["runAsUser"] == int(uid)


def test_the_build_context_leaves_out_build_output() -> None:
    ignored = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert "target/" in ignored and ".git/" in ignored
    for needed in ("src", "migrations", "Cargo.toml", "Cargo.lock", "tests"):
        assert not any(pattern.rstrip("/") == needed for pattern in ignored), f"{needed} is needed to build"


def test_the_image_carries_oci_labels() -> None:
    _, runtime = stages()
    labels = " ".join(argument for instruction, argument in runtime if instruction == "LABEL")
    for key in ("title", "source", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
