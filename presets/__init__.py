"""Paper presets: params files that hold only the keys in which a published setup differs from params.yaml.

    python -m presets                          # list the presets
    python -m presets NAME [-S KEY=VALUE ...]  # params.yaml := committed params.yaml + presets/NAME.yaml (+ -S)
    python -m presets NAME --check             # validate and show the changes, write nothing
    dvc exp run -n NAME                        # then run it (or `make preset NAME=...` for both steps)

Each preset is merged key by key (dotted leaves; lists are leaves) onto the committed params.yaml, so a
preset always means "the defaults plus these keys" whatever was applied before (--keep-local merges onto
the workspace file instead). The result is validated with pipeline.config before anything is written:
a bad preset or override is refused with the key named. params.yaml is rewritten with ruamel.yaml
(DVC's own YAML library, the one `dvc exp run -S` uses), which keeps its comments.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from pipeline import config

PRESETS_DIR = Path(__file__).resolve().parent


class PresetError(ValueError):
    """An unknown preset, a malformed override, or a merge that does not fit params.yaml's sections."""


def _yaml() -> YAML:
    """A round-trip YAML 1.2 reader/writer that keeps comments, flow lists and number formats, and writes
    None as `null` (as params.yaml does), never as an empty value."""
    y = YAML()
    y.width = 4096  # never fold the long comment lines
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def names() -> list[str]:
    """The presets shipped in presets/, by file name without .yaml."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def path_of(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"no preset {name!r}; the presets are: {', '.join(names())}")
    return path


def describe(name: str) -> str:
    """The first line of the preset's header comment."""
    first = path_of(name).read_text(encoding="utf-8").splitlines()[0]
    return first.lstrip("# ").strip()


def load_preset(name: str) -> Mapping[str, Any]:
    """The preset's mapping (ruamel round-trip types: numbers keep the format they were written in)."""
    data = _yaml().load(path_of(name).read_text(encoding="utf-8"))
    if not isinstance(data, Mapping):
        raise PresetError(f"preset {name!r} must be a mapping of params.yaml sections")
    return data


def leaves(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested mapping; lists are leaves."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaves(value, dotted + ".")
        else:
            yield dotted, value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` (as `dvc exp run -S`) -> ("key.sub", value parsed as YAML 1.2: 1e-4 a float, [1, 2] a
    list, null None, anything else a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise PresetError(f"override {text!r} must look like key.sub=value")
    return key.strip(), _yaml().load(value) if value.strip() else None


def merge(base_text: str, entries: Iterable[tuple[str, Any]]) -> str:
    """base_text (a params.yaml) with each dotted key set to its value, comments kept; sections that do not
    exist yet are added (validation then refuses keys params.yaml does not know, naming them)."""
    y = _yaml()
    doc = y.load(base_text)
    if doc is None:
        doc = CommentedMap()
    for dotted, value in entries:
        node, parts = doc, dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, Mapping):
                raise PresetError(f"{dotted}: {'.'.join(parts[:i + 1])} is a value in params.yaml, not a section")
        node[parts[-1]] = value
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def validate_text(text: str) -> config.Config:
    """Parse params text as every stage does (pipeline.config) and validate it; ConfigError names each bad key."""
    try:
        raw = yaml.load(text, Loader=config._Yaml12Loader)
    except yaml.YAMLError as err:
        raise config.ConfigError(f"not valid YAML: {err}") from None
    return config.validate(raw if raw is not None else {})


def apply(name: str, base_text: str, overrides: Iterable[str] = ()) -> tuple[str, config.Config, list[str]]:
    """(merged params text, its validated Config, the dotted keys set) for preset `name` plus `key=value`
    overrides (applied after the preset) onto base_text. Raises PresetError or config.ConfigError."""
    entries = list(leaves(load_preset(name))) + [parse_override(o) for o in overrides]
    text = merge(base_text, entries)
    return text, validate_text(text), list(dict.fromkeys(k for k, _ in entries))


def committed_text(params: Path) -> str | None:
    """params.yaml as in git HEAD, or None where there is no git, no repository or no committed file."""
    try:
        out = subprocess.run(["git", "show", f"HEAD:./{params.name}"], cwd=params.parent,
                             capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.decode("utf-8")


def write_params(path: Path, text: str) -> None:
    """Write params.yaml atomically (a temp file renamed over it), keeping the file's permissions."""
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
