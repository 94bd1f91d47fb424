"""Sturdiness: bad input is refused with a message that names it, never a traceback, and a killed stage never
leaves half a file.

1. params.yaml (hypothesis): random edits of the repo's params.yaml, and of every preset merged into it, either
   load or are refused with a ConfigError naming the edited key; files that are not params at all (not YAML,
   empty, a list, duplicate keys, missing) are refused naming the file. The same refusals through a stage's
   entry point exit 2 with that message and no traceback. A user edits this file by hand and with
   `dvc exp run -S`; a typo must cost a message that points at it, not a stack trace.
2. Model files: every torch.load in the project passes weights_only=True (read from the source's syntax tree),
   and a model file that pickles an object is refused, by io.load_torch and by the sample stage (exit 2, a
   message, no outputs): unpickling an arbitrary object runs code from the file.
3. Atomic writes: the sample stage, SIGKILLed at random points and during its final writes, leaves each output
   it declares in dvc.yaml either as it was or complete, never half written (DVC would cache a torn file).
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import presets
from pipeline import config, io
from pipeline.errors import DataError
from stages.common import run_stage
from test_stages import STAGES, TINY, _deep_merge, _run, _write_params, workdir  # noqa: F401 (workdir: a fixture)

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- 1. params.yaml edits


def _parse(text: str) -> dict:
    """Params text as the stages read it (YAML 1.2 floats)."""
    return yaml.load(text, Loader=config._Yaml12Loader)


BASE_TEXT = (REPO / "params.yaml").read_text(encoding="utf-8")
BASE = _parse(BASE_TEXT)
# Each preset merged onto params.yaml key by key, as `python -m presets NAME` writes it.
PRESETS = {name: _parse(presets.merge(BASE_TEXT, presets.leaves(presets.load_preset(name))))
           for name in presets.names()}


def _choices(model: type[BaseModel]) -> set[str]:
    """Every string a Literal of the schema allows ('auto', 'ncsnv2', 'gmm', ...): values that pass the type
    check and so reach the cross-field checks, which random text almost never does."""
    found: set[str] = set()

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            found.update(_choices(tp))
        elif typing.get_origin(tp) is typing.Literal:
            found.update(a for a in typing.get_args(tp) if isinstance(a, str))
        for arg in typing.get_args(tp):
            walk(arg)

    for field in model.model_fields.values():
        walk(field.annotation)
    return found


CHOICES = sorted(_choices(config.Config))
# Text that YAML or pydantic read specially: bare '.', '-' and '+' once crashed the YAML 1.2 float resolver;
# 'int', "literal['auto']"... are also pydantic's names for union members in an error's location.
TRICKY_TEXT = ["", " ", "auto", "null", "~", "yes", "no", "on", "off", "true", "False", ".", "-", "+", "-.", ".e5",
               "-e5", "1e5", "1_000", "0x1f", "0o17", "1:30", "2001-01-01", ".nan", ".inf", "-.inf", "NaN", "é",
               "日本語", "a\nb", "\t", "#", "&a", "*a", "!!float", "int", "str", "float", "bool", "list[int]",
               "literal['auto']", "function-after[_fractions()]", "a.b", "\u2028", "\x00"]
SCALARS = st.one_of(
    st.integers(), st.sampled_from([0, -1, 1, 2, 3, 2**31, -2**63, 2**63, 10**30, -10**30]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-300, 1e308]),
    st.text(max_size=8), st.sampled_from(TRICKY_TEXT), st.booleans(), st.none(), st.sampled_from(CHOICES))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
# Replacing a whole section: a scalar or a list where a mapping belongs.
NOT_MAPPINGS = st.one_of(SCALARS, st.lists(SCALARS, max_size=3))
UNKNOWN_KEYS = st.one_of(st.text(max_size=10), st.sampled_from(TRICKY_TEXT), st.integers(), st.booleans(),
                         st.none(), st.floats(allow_nan=False))


def _paths(tree: dict, prefix: tuple = ()) -> Iterator[tuple]:
    """Every dotted key of a params tree as a tuple, sections and leaves (lists are leaves)."""
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


def _node(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def edits(draw, base: dict) -> tuple[dict, str, tuple]:
    """(edited copy of base, kind, the path the edit concerns). Kinds: set a key to a value of any type, delete
    it, add an unknown key next to it, or replace the section that holds it by a scalar or a list."""
    tree = json.loads(json.dumps(base))
    path = draw(st.sampled_from(sorted(_paths(tree), key=str)))
    kind = draw(st.sampled_from(["set", "delete", "unknown", "section"]))
    parent = _node(tree, path[:-1])
    if kind == "set":
        parent[path[-1]] = draw(VALUES)
    elif kind == "delete":
        del parent[path[-1]]
    elif kind == "unknown":
        key = draw(UNKNOWN_KEYS.filter(lambda k: k not in parent))
        parent[key] = draw(VALUES)
        path = path[:-1] + (key,)
    else:
        if not isinstance(parent.get(path[-1]), dict):  # a leaf: its section (a top-level key: itself)
            path = path[:-1] or path
        _node(tree, path[:-1])[path[-1]] = draw(NOT_MAPPINGS)
    return tree, kind, path


def _dump(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def _name(key: Any) -> str:
    """A key as a refusal shows it: plain text, or repr where plain text would hide it (pipeline.config)."""
    plain = isinstance(key, str) and key and key == key.strip() and key.isprintable()
    return key if plain else repr(key)


def _loaded_key(text: str, path: tuple, base: dict) -> tuple:
    """The unknown key's path as the stage reads the file: YAML 1.2 reads some plain text differently (the
    string '1e5' is written unquoted and read back as the float 1e5)."""
    section = _node(_parse(text), path[:-1])
    new = [k for k in section if k not in _node(base, path[:-1])]
    assert len(new) == 1, (path, new)
    return path[:-1] + (new[0],)


def _names_key(message: str, path: tuple) -> bool:
    """Whether the message names the dotted key: as a whole dotted name ('seed' is not named by 'sample.seed'),
    possibly followed by a key under it ('data.gmm.means.0.1' names data.gmm.means), or by a wildcard over a
    section above it ('sample.inpaint.*' names sample.inpaint.alpha)."""
    dotted = ".".join(_name(p) for p in path)
    if re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", message):
        return True
    # 'sample.inpaint.*' names every key under sample.inpaint
    return any(f"{'.'.join(map(str, path[:i]))}.*" in message for i in range(1, len(path)))


def _section_checks(path: tuple) -> list[tuple]:
    """The sections above `path` that have a check across their own keys (a model validator: data.gmm's mixture
    of weights, means and covs), nearest first."""
    found, model = [], config.Config
    for i, key in enumerate(path[:-1]):
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
        if model.__pydantic_decorators__.model_validators:
            found.insert(0, path[:i + 1])
    return found


def _names_edit(message: str, path: tuple) -> bool:
    """The rule of the properties: the message names the edited key (or a key under it), or a line of it is the
    refusal of a section's own cross-key check above that key ('data.gmm: invalid mixture: ...' for an edit of
    data.gmm.covs: the mixture's keys are judged together)."""
    sections = [".".join(s) for s in _section_checks(path)]
    return _names_key(message, path) or any(re.search(rf"^  {re.escape(s)}: ", message, re.M) for s in sections)


def _refuse_body(cfg: config.Config, run: Any) -> None:
    pytest.fail("the stage body ran on params that config.load refuses")


def _check_edit(path_file: Path, tree: dict, kind: str, path: tuple, base: dict, capsys) -> None:
    """config.load(edited file) returns a Config or raises a ConfigError naming the edited key; refused params
    also stop the report stage's entry point: exit 2, the ConfigError's message on stderr, no traceback."""
    text = _dump(tree)
    path_file.write_text(text, encoding="utf-8")
    if kind == "unknown":
        path = _loaded_key(text, path, base)
    try:
        loaded = config.load(path_file)
    except config.ConfigError as err:
        message = str(err)
    else:
        assert isinstance(loaded, config.Config)
        return
    # A file-level refusal (the edit made text YAML cannot read, e.g. two keys that YAML 1.2 reads as the same
    # float) names the file and the line instead.
    file_level = message.startswith(f"{path_file}: ") and re.search(r"line \d+", message)
    assert file_level or _names_edit(message, path), \
        f"{kind} {'.'.join(map(str, path))}: the refusal does not name it:\n{message}"
    capsys.readouterr()
    assert run_stage("report", _refuse_body, ["--params", str(path_file)]) == 2
    out = capsys.readouterr()
    assert out.err == f"report: {message}\n" and "Traceback" not in out.err, out.err


EDIT_SETTINGS = settings(max_examples=200, derandomize=True, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@EDIT_SETTINGS
@given(edit=edits(BASE))
def test_random_edits_of_params_load_or_name_the_key(tmp_path, capsys, edit):
    """An edit of params.yaml loads, or its ConfigError names the edited key. Anything else raised fails.

    The rule, precisely: a refusal passes when
    (a) its message contains the dotted path of the edited key (the key set or deleted, the unknown key added as
        YAML 1.2 reads the file back, the section replaced), as a whole dotted name ('seed' is not named by
        'sample.seed'), alone or followed by a key under it ('data.gmm.means.0.1'); a key that plain text would
        hide ('', ' x', 'a\\nb', None, 1.5) is named by its repr;
    (b) it names a section above the key with a wildcard ('sample.inpaint.* applies to sample.task: inpaint');
    (c) one of its lines is the refusal of the cross-key check of a section above the key ('data.gmm: invalid
        mixture: ...' for an edit of data.gmm.covs: weights, means and covs are judged together); or
    (d) the edited text is no longer readable YAML, and the message names the file and the line.
    Config's cross-field refusals (lines without a 'key:' prefix) get no exception: the unedited file loads
    (test_the_unedited_files_load), so the edited key is always one of the keys such a refusal concerns, and
    each of those checks names the keys it compares. A deleted key takes its default, so deleting one is
    refused only by a cross-field check, which must then name the deleted key."""
    _check_edit(tmp_path / "params.yaml", *edit, BASE, capsys)


@EDIT_SETTINGS
@given(data=st.data())
def test_random_edits_of_every_preset_load_or_name_the_key(tmp_path, capsys, data):
    """The same rule on params.yaml with each preset merged in (CIFAR-10, U-Nets, ddpm, SDEs, likelihoods)."""
    base = PRESETS[data.draw(st.sampled_from(sorted(PRESETS)))]
    _check_edit(tmp_path / "params.yaml", *data.draw(edits(base)), base, capsys)


def test_the_unedited_files_load():
    """The starting points of the properties are valid, so every refusal there is the edit's doing."""
    assert isinstance(config.validate(BASE), config.Config)
    for name, tree in PRESETS.items():
        assert isinstance(config.validate(tree), config.Config), name


NOT_PARAMS = {
    "unclosed list": "train: [unclosed\n",
    "tab indentation": "data:\n\tname: moons\n",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "not UTF-8": b"seed: \xff\xfe\n",
    "unreadable tagged scalar": "seed: !!int abc\n",
    "python object tag": "seed: !!python/object/apply:os.system ['true']\n",
    "undefined alias": "seed: *nowhere\n",
    "two documents": "seed: 1\n---\nseed: 2\n",
    "nested too deeply": "seed: " + "[" * 1000 + "]" * 1000 + "\n",
    "empty": "",
    "only comments": "# params.yaml\n\n",
    "top-level list": "- seed\n- data\n",
    "top-level scalar": "42\n",
    "top-level text": "just some words\n",
    "duplicate top-level key": "seed: 0\nseed: 1\n",
    "duplicate nested key": "data:\n  name: moons\n  noise: 0.1\n  name: gmm\n",
}


@pytest.mark.parametrize("case", list(NOT_PARAMS))
def test_a_file_that_is_not_params_is_refused_naming_it(tmp_path, capsys, case):
    content = NOT_PARAMS[case]
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    _assert_refused_naming(path, capsys)


def test_a_duplicate_key_deep_in_the_real_params_is_refused(tmp_path, capsys):
    """PyYAML would keep the last value silently; DVC's reader refuses the file, and so does every stage."""
    path = tmp_path / "params.yaml"
    path.write_text(BASE_TEXT.replace("    method: replace", "    method: replace\n    method: mcg", 1))
    assert path.read_text() != BASE_TEXT
    _assert_refused_naming(path, capsys)
    assert "duplicate key 'method'" in str(_refusal(path))


@pytest.mark.parametrize("where", ["missing", "a directory"])
def test_a_missing_params_file_is_refused_naming_it(tmp_path, capsys, where):
    path = tmp_path / "params.yaml"
    if where == "a directory":
        path.mkdir()
    _assert_refused_naming(path, capsys)


@pytest.mark.parametrize("edit, key", [
    ({"data": {"name": "file", "path": "x" * 300 + ".npy"}}, "data.path"),  # the OS cannot look the name up
    ({"data": {"name": "folder", "path": "x" * 300}}, "data.path"),
    ({"data": {"name": "gmm", "gmm": {"weights": [float("nan"), 1.0]}}}, "data.gmm"),  # NaN > 0 is False
    ({"data": {"name": "gmm", "gmm": {"covs": [[float("inf"), 1.0], [0.5, 3.0]]}}}, "data.gmm"),
    ({"data": {"name": "gmm", "gmm": {"means": [[float("nan"), 2.0], [-1.0, 1.0]]}}}, "data.gmm"),
])
def test_values_the_properties_cannot_reach_in_one_edit_are_refused(edit, key):
    """Two keys at once (found by stacking edits): a path too long for the OS was an OSError traceback, and
    NaN / inf in a mixture loaded, since every comparison with NaN is false."""
    raw = _deep_merge(config.to_dict(config.load(REPO / "params.yaml")), edit)
    with pytest.raises(config.ConfigError, match=re.escape(key)):
        config.validate(raw)


def test_merge_keys_still_override(tmp_path):
    """The duplicate-key check leaves YAML merge keys alone: a key may override what `<<` brings in."""
    path = tmp_path / "params.yaml"
    path.write_text("data: {name: moons}\neval:\n  <<: {n: 200, seed: 3}\n  n: 100\n  cloud_size: 10\n  emd_n: 100\n")
    cfg = config.load(path)
    assert cfg.eval.n == 100 and cfg.eval.seed == 3 and cfg.data.name == "moons"


def _refusal(path: Path) -> config.ConfigError:
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    return info.value


def _assert_refused_naming(path: Path, capsys) -> None:
    """config.load refuses with the file named; the stage entry point exits 2 with that one message."""
    message = str(_refusal(path))
    assert str(path) in message, message
    capsys.readouterr()
    assert run_stage("report", _refuse_body, ["--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"report: {message}\n" and "Traceback" not in err, err


# --------------------------------------------------------------------------- 2. weights-only model files

SOURCE_DIRS = ("pipeline", "stages", "benchmarks", "presets")


def _torch_load_calls(tree: ast.Module) -> Iterator[ast.Call]:
    """Every call of torch.load in a module, however torch or load was imported (import torch as t; from torch
    import load as l; torch.serialization.load)."""
    modules, functions = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name == "torch")
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            functions.update(a.asname or a.name for a in node.names if a.name == "load")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in functions:
            yield node
        elif isinstance(f, ast.Attribute) and f.attr == "load":
            owner = ast.unparse(f.value)
            if owner in modules or owner in {f"{m}.serialization" for m in modules}:
                yield node


def test_every_torch_load_is_weights_only():
    calls = []
    for folder in SOURCE_DIRS:
        for source in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
            calls += [(source.relative_to(REPO), call) for call in _torch_load_calls(tree)]
    assert len(calls) >= 2, "found no torch.load calls: the search is broken"  # io.load_torch, domain
    for where, call in calls:
        flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        assert isinstance(flag, ast.Constant) and flag.value is True, \
            f"{where}:{call.lineno}: {ast.unparse(call)} must pass weights_only=True"


class Payload:
    """An object pickled into a model file. A full unpickler calls __setstate__, i.e. runs code that came with
    the file; it leaves a marker file so that the test sees whether it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("unpickled")


# The sample stage's outputs and metrics as dvc.yaml declares them.
_SAMPLE_STAGE = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sample"]
SAMPLE_OUTPUTS = [next(iter(o)) if isinstance(o, dict) else o
                  for key in ("outs", "metrics", "plots") for o in _SAMPLE_STAGE.get(key, [])]
# A store that does not answer (a closed local port): tracking is not what these tests check, and pipeline.tracking
# turns itself off at once for it (no MLflow import, no sqlite store to create), so the stages cost their own work.
NO_TRACKING = "http://127.0.0.1:9"
# A trained tiny model: two noise scales of one Langevin step each, so that the sample stage's cost is mostly its
# per-sample generators and writes, and enough samples that samples.npz (8 bytes a point) takes a moment to write.
KILL_N = 20_000
KILL_PARAMS = _deep_merge(TINY, {"noise": {"fallback_num_scales": 2, "steps_per_scale": 1},
                                 "sample": {"n": KILL_N, "batch_size": KILL_N}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny project up to models/final.pt (prepare, noise_scales, train, ema, distill), made once for this
    module."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key in ("DVC_ROOT", "DVC_EXP_NAME"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", NO_TRACKING)
        _write_params(root / "params.yaml", KILL_PARAMS)
        for name in STAGES[:STAGES.index("distill") + 1]:
            if name not in ("fid_reference", "classifier"):  # images only
                assert _run(name) == 0, name
    return root


@pytest.mark.xdist_group("sturdy_trained")  # one worker builds `trained` once
@pytest.mark.filterwarnings("ignore::pipeline.tracking.TrackingWarning")
def test_a_model_file_with_a_pickled_object_is_refused(trained, workdir, capsys, monkeypatch):
    shutil.copytree(trained, workdir, dirs_exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NO_TRACKING)
    marker = workdir / "payload-ran"
    model = torch.load("models/final.pt", weights_only=True)
    assert set(model) == {"config", "state_dict"}
    torch.save({**model, "extra": Payload(marker)}, "models/final.pt")
    with pytest.raises(DataError, match="models/final.pt is not a weights-only model file"):
        io.load_torch("models/final.pt")
    capsys.readouterr()
    assert _run("sample") == 2
    err = capsys.readouterr().err
    assert "sample: models/final.pt is not a weights-only model file" in err and "Traceback" not in err, err
    assert not any(Path(p).exists() for p in SAMPLE_OUTPUTS)
    assert not marker.exists()  # the object was never unpickled


# --------------------------------------------------------------------------- 3. atomic writes under SIGKILL


def _stage_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MLFLOW_TRACKING_URI"] = NO_TRACKING
    return env


def _temps(root: Path) -> set[Path]:
    """The temporary files io.atomic_path leaves when killed (.NAME.XXXX.tmp next to a declared output)."""
    return {t for out in SAMPLE_OUTPUTS for t in (root / out).parent.glob(f".{Path(out).name}.*.tmp")}


def _sample(root: Path, seed: int, kill_at: Optional[float] = None, kill_on_write: Optional[str] = None
            ) -> tuple[int, float, bool]:
    """Run `python -m stages.sample` in root with sample.seed = seed, and SIGKILL it `kill_at` seconds after the
    start, or the moment the output `kill_on_write` is being written: its temp file appears, or (a write too quick
    for the poll) the file itself has just been replaced. (exit status, seconds, whether the kill landed while
    the temp file existed)."""
    _write_params(root / "params.yaml", _deep_merge(KILL_PARAMS, {"sample": {"seed": seed}}))
    target = root / (kill_on_write or SAMPLE_OUTPUTS[0])
    prefix = f".{target.name}."
    old_temps = {n for n in os.listdir(target.parent) if n.startswith(prefix)}  # left by earlier kills
    old_stat = _stat(target)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "stages.sample"], cwd=root, env=_stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    during_write = False
    try:
        if kill_at is not None:
            try:
                proc.wait(timeout=kill_at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        elif kill_on_write:
            while proc.poll() is None:  # one listdir a half millisecond: a write of ~100 kB lasts about that long
                during_write = any(n.startswith(prefix) and n not in old_temps for n in os.listdir(target.parent))
                if during_write or _stat(target) != old_stat:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.0005)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, time.monotonic() - start, during_write


def _stat(path: Path) -> Optional[tuple[int, int]]:
    """(inode, mtime) of a file, None when absent: a rename over it changes the inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _complete(path: Path) -> bool:
    """Whether `path` is a whole output of a sample run: it loads and has the right keys and shape."""
    if path.suffix == ".npz":
        arrays = io.load_npz(path)
        return set(arrays) == {"x"} and arrays["x"].shape == (KILL_N, 2) and bool(np.isfinite(arrays["x"]).all())
    if path.suffix == ".json":
        return json.loads(path.read_text()).get("n") == KILL_N
    if path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as image:
            image.load()  # decodes every row: a truncated file raises
        return path.read_bytes().endswith(b"IEND\xaeB`\x82")
    raise AssertionError(f"no completeness check for {path}")


def _check_outputs(root: Path, previous: dict[str, Optional[bytes]], when: str) -> dict[str, Optional[bytes]]:
    """Every declared output is as before the run, or a complete new one; never half a file. The stage never
    deletes an output, so one that existed must still exist."""
    now = {}
    for out in SAMPLE_OUTPUTS:
        path = root / out
        assert not path.is_symlink() and (not path.exists() or path.is_file()), (when, out)
        now[out] = path.read_bytes() if path.exists() else None
        if now[out] is None:
            assert previous[out] is None, f"{when}: {out} was removed"
        elif now[out] != previous[out]:
            try:
                assert _complete(path), f"{when}: {out} is not a complete output"
            except Exception as err:  # noqa: BLE001: a torn file fails to load in its own way
                raise AssertionError(f"{when}: {out} is half written ({type(err).__name__}: {err})") from None
    # Leftover temp files are hidden siblings, never at a declared path.
    assert not {str(t.relative_to(root)) for t in _temps(root)} & set(SAMPLE_OUTPUTS)
    return now


@pytest.mark.xdist_group("sturdy_trained")

@pytest.mark.xdist_group("sturdy_trained")
@pytest.mark.filterwarnings("ignore::pipeline.tracking.TrackingWarning")
@pytest.mark.parametrize("content, words", [(b"not a zip at all", "not a model file written by torch.save"),
                                            (None, "not a torch.save archive (no data.pkl)")])
def test_the_ema_stage_refuses_what_is_not_a_model_file(trained, workdir, capsys, monkeypatch, content, words):
    """The ema stage checks the archive's structure without importing torch; garbage is bad input (exit 2), and
    models/model.pt stays as it was."""
    import zipfile

    shutil.copytree(trained, workdir, dirs_exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", NO_TRACKING)
    before = Path("models/model.pt").read_bytes()
    if content is None:
        with zipfile.ZipFile("models/ema.pt", "w") as z:
            z.writestr("archive/other.txt", "x")
    else:
        Path("models/ema.pt").write_bytes(content)
    assert _run("ema") == 2
    err = capsys.readouterr().err
    assert "ema: ema.method: decay EMA weights: models/ema.pt" in err and words in err and "Traceback" not in err
    assert Path("models/model.pt").read_bytes() == before


def test_outputs_get_the_mode_open_would_give_them(tmp_path):
    """mkstemp makes its file 0600; an output renamed from it must be readable as any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    io.write_text(tmp_path / "out.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~umask

@pytest.mark.filterwarnings("ignore::pipeline.tracking.TrackingWarning")
def test_killed_sample_stage_leaves_each_output_whole_or_as_it_was(trained, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(trained, root)
    previous: dict[str, Optional[bytes]] = {out: None for out in SAMPLE_OUTPUTS}
    rc, duration, _ = _sample(root, seed=0)  # a complete run: the previous outputs, and the stage's duration
    assert rc == 0
    previous = _check_outputs(root, previous, "complete run")
    assert all(previous.values())
    rng = random.Random(5)  # seeded: the same kill times in every run of the suite
    # The write-aimed kills first: the later runs then write next to the temp files those leave behind.
    plan = [{"kill_on_write": "outputs/samples.npz"}, {"kill_on_write": "outputs/samples.png"}]
    plan += [{"kill_at": rng.uniform(0.05, 1.0) * duration} for _ in range(2)]
    hits = []
    for seed, kill in enumerate(plan, start=1):  # another sample.seed each time: new outputs differ from the old
        rc, _, during_write = _sample(root, seed, **kill)
        assert rc in (0, -signal.SIGKILL), (kill, rc)
        previous = _check_outputs(root, previous, f"kill {kill}")
        hits.append(during_write)
    # samples.png renders for a tenth of a second inside its temp file: that kill lands mid-write every time
    # (the npz one only when a poll falls in its milliseconds)
    assert hits[1], "the kill aimed at the samples.png write missed it: the test no longer exercises atomic_path"
