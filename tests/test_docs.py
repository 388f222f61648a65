"""The README stays true: every setting is documented with its default."""

from __future__ import annotations

import json
from pathlib import Path

from sluice.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    defaults = Settings()
    for name, field in Settings.model_fields.items():
        variable = f"SLUICE_{name.upper()}"
        assert variable in README, f"{variable} is not documented in README.md"
        value = getattr(defaults, name)
        if value is None or field.exclude:
            continue
        shown = (
            json.dumps(value) if isinstance(value, dict) else ",".join(value) if isinstance(value, list) else str(value)
        )
        row = next(
            line for line in README.splitlines() if line.startswith(f"| `{variable}`") or f", `{variable}`" in line
        )
        assert shown in row.replace("`", ""), f"README gives another default for {variable}: {row}"
