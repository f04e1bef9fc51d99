"""A fit on disk: the unit costs of each path, the cores they were fitted
with, and the measurements they came from (JSON).

Where: ``--out``/``--params`` if given, else $XDG_CACHE_HOME (~/.cache)
/meshrun/collectives-model.json. When no fit has been made on this
machine, the one shipped with the package (fitted.json: the 2-core
development VM, under load) is read, and the tools say so.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .costs import PATHS, Params

__all__ = ["Fit", "default_path", "shipped_path", "load", "save"]


@dataclass(frozen=True)
class Fit:
    """Unit costs per path, the host's cores, and the rows behind them."""
    params: dict[str, Params]
    cores: int
    rows: list[dict] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        return {"cores": self.cores, "note": self.note,
                "params": {p: v.as_dict() for p, v in self.params.items()},
                "rows": self.rows}

    @classmethod
    def from_json(cls, d: dict) -> "Fit":
        params = {p: Params(**v) for p, v in d["params"].items()}
        missing = [p for p in PATHS if p not in params]
        if missing:
            raise ValueError(f"fit has no parameters for path(s) {missing}")
        return cls(params, int(d["cores"]), list(d.get("rows", [])), d.get("note", ""))


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshrun" / "collectives-model.json"


def shipped_path() -> Path:
    return Path(__file__).with_name("fitted.json")


def load(path: str | os.PathLike | None = None) -> tuple[Fit, Path]:
    """The fit at ``path``, else this machine's, else the shipped one."""
    if path is not None:
        p = Path(path)
    else:
        p = default_path() if default_path().exists() else shipped_path()
    with open(p) as f:
        return Fit.from_json(json.load(f)), p


def save(fit: Fit, path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path is not None else default_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        json.dump(fit.to_json(), f, indent=1)
        f.write("\n")
    return p
