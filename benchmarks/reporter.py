"""How a child process hands its findings to the runner: JSON in a file, replaced atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Reporter:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
