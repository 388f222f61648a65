"""What the images hold: a non-root user; in ``runtime``, no compiler, no test dependency, and no copy of this
machine's CA bundle (which the builder stages may use to reach PyPI). Each check also runs once on an image
that does hold the thing, so a check that cannot fail would show."""

from __future__ import annotations

import hashlib
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from devstack import PROJECT

pytestmark = [pytest.mark.containers, pytest.mark.timeout(300)]

HOST_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = PROJECT / "containers" / "build-ca" / "ca.crt"
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def sh(image: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "sh", image, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )


def certs(data: bytes) -> set[bytes]:
    return {b"".join(body.split()) for body in PEM.findall(data)}


def host_extra_certs() -> set[bytes]:
    """The certificates this machine trusts beyond Debian's stock set (the ones only it should have)."""
    stock: set[bytes] = set()
    for path in Path("/usr/share/ca-certificates/mozilla").glob("*.crt"):
        stock |= certs(path.read_bytes())
    return certs(HOST_BUNDLE.read_bytes()) - stock


def ca_findings(image: str) -> list[str]:
    """Every file of the image's filesystem that is the host's bundle or holds one of its extra certificates."""
    bundle_hash = hashlib.sha256(HOST_BUNDLE.read_bytes()).hexdigest()
    extra = host_extra_certs()
    cid = subprocess.run(["docker", "create", image], capture_output=True, text=True, check=True).stdout.strip()
    found: list[str] = []
    try:
        with subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE) as export:
            assert export.stdout is not None
            with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
                for member in tar:
                    if not member.isfile() or member.size > 50_000_000:
                        continue
                    handle = tar.extractfile(member)
                    data = handle.read() if handle else b""
                    if hashlib.sha256(data).hexdigest() == bundle_hash:
                        found.append(f"{member.name}: a copy of {HOST_BUNDLE}")
                    elif b"-----BEGIN CERTIFICATE-----" in data and certs(data) & extra:
                        found.append(f"{member.name}: holds {len(certs(data) & extra)} of this machine's extra CAs")
        assert export.returncode == 0
    finally:
        subprocess.run(["docker", "rm", cid], capture_output=True, check=True)
    return found


@pytest.mark.parametrize("image", ["sluice:local", "sluice-loadtest:local"])
def test_runs_as_a_non_root_user(docker_ready: None, image: str) -> None:
    user = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Config.User}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert user == "10001:10001"
    ids = sh(image, "id -u; id -g")
    assert ids.returncode == 0, ids.stderr
    assert ids.stdout.split() == ["10001", "10001"]


def test_runtime_has_no_compiler_and_no_test_dependencies(docker_ready: None) -> None:
    tools = sh(
        "sluice:local",
        "for t in gcc cc c++ g++ clang tcc ld as make; do command -v $t; done; ls /usr/bin/*gcc* 2>/dev/null",
    )
    assert tools.stdout.strip() == "", f"build tools in the runtime image: {tools.stdout}"
    probe = (
        "python -c \"import importlib.util as u; print(' '.join(m for m in "
        "('pytest', 'locust', 'schemathesis', 'mypy', 'ruff', 'pytest_timeout', 'moto', 'pip', 'uv')"
        ' if u.find_spec(m)))"'
    )
    runtime = sh("sluice:local", probe)
    assert runtime.returncode == 0, runtime.stderr
    assert runtime.stdout.strip() == "", f"test or build dependencies in the runtime image: {runtime.stdout}"
    # The same probe on the loadtest image, which does ship locust: the probe can see a package when there is one.
    loadtest = sh("sluice-loadtest:local", probe)
    assert "locust" in loadtest.stdout.split(), loadtest.stdout + loadtest.stderr


def test_runtime_holds_no_copy_of_this_machines_ca_bundle(docker_ready: None) -> None:
    assert ca_findings("sluice:local") == []


@pytest.mark.skipif(not BUILD_CA.exists(), reason="no CA bundle was passed to the builder on this machine")
def test_the_ca_check_finds_the_bundle_in_the_builder_stage(docker_ready: None) -> None:
    # The builder stage does hold the bundle (it needs it to reach PyPI here): the scan must see it there.
    subprocess.run(
        ["docker", "build", "-q", "--target", "builder", "-t", "sluice-builder:check", "."],
        cwd=PROJECT, capture_output=True, check=True, timeout=600,
    )  # fmt: skip
    try:
        findings = ca_findings("sluice-builder:check")
        assert any(f.startswith("tmp/build-ca/ca.crt:") for f in findings), findings
    finally:
        subprocess.run(["docker", "rmi", "sluice-builder:check"], capture_output=True)
