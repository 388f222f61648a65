"""The README stays true: every setting with its default, every error code, the Python versions, and the
examples (the client's and the gzip one) run as written."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import redis

from sluice import keys
from sluice.settings import Settings
from tests.support import TEST_KEY, Service

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    defaults = Settings()
    for name, field in Settings.model_fields.items():
        variable = f"SLUICE_{name.upper()}"
        assert variable in README, f"{variable} is not documented in README.md"
        value = getattr(defaults, name)
        if value is None or field.exclude:
            continue
        # As it is written in the environment: JSON for a dict, commas for a list, true/false for a flag.
        shown = (
            json.dumps(value) if isinstance(value, dict | bool)
            else ",".join(value) if isinstance(value, list)
            else str(value)
        )  # fmt: skip
        row = next(
            line for line in README.splitlines() if line.startswith(f"| `{variable}`") or f", `{variable}`" in line
        )
        assert shown in row.replace("`", ""), f"README gives another default for {variable}: {row}"


def api_error_codes() -> set[str]:
    """Every error code the API can answer with, read from api/'s source: the literal codes given to
    ``ApiError``, ``error_response`` and ``_batch_error``, the framework errors' map, and codes picked with
    their status as a ``(code, status)`` pair."""
    codes: set[str] = set()
    for path in (ROOT / "api").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                position = {"ApiError": 1, "error_response": 1, "_batch_error": 0}.get(name)
                if position is not None and len(node.args) > position:
                    arg = node.args[position]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        codes.add(arg.value)
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_HTTP_CODES" for t in node.targets):
                assert isinstance(node.value, ast.Dict)
                codes.update(str(v.value) for v in node.value.values if isinstance(v, ast.Constant))
            elif isinstance(node, ast.Tuple) and len(node.elts) == 2:
                code, status = node.elts
                if (isinstance(code, ast.Constant) and isinstance(code.value, str)
                        and isinstance(status, ast.Constant) and isinstance(status.value, int)
                        and 400 <= status.value < 600):  # fmt: skip
                    codes.add(code.value)
    return codes


def test_every_error_code_the_api_answers_is_in_the_readme_table() -> None:
    codes = api_error_codes()
    # The scan itself must keep finding codes, or this test would pass on nothing.
    assert {"malformed_gzip", "conflict", "invalid_events", "queue_timeout", "method_not_allowed"} <= codes
    table = README[README.index("### Errors") : README.index("### Health")]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    missing = sorted(code for code in codes if not any(f"`{code}`" in row for row in rows))
    assert not missing, f"error codes the API answers but README.md's error table does not list: {missing}"


def test_the_readme_names_the_python_versions_pyproject_allows() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.13", "update the README's Python versions with requires-python"
    assert "Python 3.11 or 3.12" in README
    assert "3.11+" not in README


def code_block(after: str, language: str) -> str:
    start = README.index(f"```{language}\n", README.index(after)) + len(f"```{language}\n")
    return README[start : README.index("```", start)]


def run_python_example(section: str, api: Service) -> subprocess.CompletedProcess[str]:
    """The section's first Python example, run as written but with the test API and key; it must exit 0."""
    example = code_block(section, "python")
    key_line = 'Path(".data/dev/api-key").read_text().strip()'
    assert key_line in example
    assert '"http://127.0.0.1:8000"' in example
    program = example.replace(key_line, repr(TEST_KEY)).replace('"http://127.0.0.1:8000"', repr(api.base_url))
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_the_readme_client_example_sends_ten_thousand_events(
    isolated_api: Service, isolated_queue: redis.Redis
) -> None:
    out = run_python_example("## Send events", isolated_api)
    assert out.stdout.strip() == "10000 accepted, 0 rejected"


def test_the_readme_gzip_example_posts_a_real_batch(
    isolated_api: Service, isolated_queue: redis.Redis, tmp_path: Path
) -> None:
    block = code_block("### Events", "sh")
    script = block[block.index("# gzip bodies are welcome") :].replace("http://127.0.0.1:8000", isolated_api.base_url)
    for _ in range(3):
        out = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "KEY": TEST_KEY})  # fmt: skip
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        # The key's rate limit (10,000 events/s) is shared with the client example just before: its next second.
        if answer.get("error", {}).get("code") != "rate_limited":
            break
        time.sleep(1.1)
    assert (answer.get("accepted"), answer.get("rejected")) == (1000, 0), out.stdout[:500]


def test_the_readme_sdk_snippets_send_through_the_real_sdks(isolated_api: Service, isolated_queue: redis.Redis) -> None:
    out = run_python_example("## Send from the SDK you already use", isolated_api)
    assert "error" not in out.stderr.lower(), out.stderr[-3000:]
    # One event from each SDK, each its own batch: three messages on the queue.
    assert isolated_queue.llen(keys.EVENTS_QUEUE) == 3
