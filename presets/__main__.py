"""python -m presets [NAME] [-S KEY=VALUE ...] [--check] [--keep-local] [--params params.yaml]

Without NAME: list the presets. With NAME: write params.yaml = the committed params.yaml + presets/NAME.yaml
(+ the -S overrides, in order), validated first; then print the dvc command that runs it.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from pipeline.config import ConfigError
from presets import PresetError, apply, committed_text, describe, names, write_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="the preset (presets/NAME.yaml); none: list them")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a further key after the preset's, as dvc exp run -S (e.g. -S data.path=/data/cifar10)")
    parser.add_argument("--check", action="store_true", help="validate and show the changes; write nothing")
    parser.add_argument("--keep-local", action="store_true",
                        help="merge onto the workspace params file instead of the committed one")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = parser.parse_args(argv)

    if args.name is None:
        for name in names():
            print(f"{name:20s} {describe(name)}")
        return 0
    params = Path(args.params)
    local = params.read_text(encoding="utf-8") if params.is_file() else None
    base, where = (None, "") if args.keep_local else (committed_text(params), "the committed")
    if base is None:
        if local is None:
            print(f"presets: {params} not found", file=sys.stderr)
            return 2
        base, where = local, "the workspace"
    try:
        text, _, keys = apply(args.name, base, args.overrides)
    except (PresetError, ConfigError) as err:
        print(f"presets: {args.name}: {err}", file=sys.stderr)
        return 2

    if args.check:
        sys.stdout.writelines(difflib.unified_diff((local or "").splitlines(True), text.splitlines(True),
                                                   f"{params} (now)", f"{params} (with {args.name})"))
        print(f"presets: {args.name} is valid on {where} {params} ({len(keys)} keys); nothing written")
        return 0
    write_params(params, text)
    extra = f" + {len(args.overrides)} override(s)" if args.overrides else ""
    print(f"{params}: {where} file + presets/{args.name}.yaml{extra}: {len(keys)} keys set, validated")
    if where == "the committed" and local is not None and local != base:
        print(f"  note: the uncommitted edits of {params} were replaced (--keep-local applies the preset on top)")
    print(f"now run it:\n  dvc exp run -n {args.name}\n"
          f"or queue it:\n  dvc exp run --queue -n {args.name} && dvc queue start\n"
          f"back to the defaults afterwards: git checkout {params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
