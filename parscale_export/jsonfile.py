"""Reading a JSON object from a file, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ParScaleExportError


def read_json_object(path: Path, error: type[ParScaleExportError]) -> dict[str, Any]:
    """The JSON object in `path`; unreadable, malformed or non-object content raises `error`."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return raw
