"""`python -m shards verify PATH_OR_URL` and `python -m shards inspect PATH_OR_URL [--split val] [--decode N]`."""
from __future__ import annotations

import argparse
import json
import sys

from shards import storage
from shards.manifest import ManifestError, load_manifest
from shards.summary import decoded_lines, summary_lines
from shards.verify import VerifyError, verify


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("verify", "inspect"):
        s = sub.add_parser(name)
        s.add_argument("path", help="dataset folder: local path or fsspec URL (s3://bucket/prefix/name)")
        s.add_argument("--storage_options", type=json.loads, default=None, help="JSON dict passed to fsspec")
        if name == "inspect":
            s.add_argument("--split", default="train")
            s.add_argument("--decode", type=int, default=0, metavar="N", help="print N decoded windows")
    args = p.parse_args(argv)
    fs, root = storage.open_fs(args.path, args.storage_options)
    try:
        m = load_manifest(fs, root)
        if args.cmd == "verify":
            counts = verify(fs, root, m)
            print(f"OK {args.path}: " + ", ".join(f"{k} {v} samples" for k, v in counts.items()))
        else:
            print("\n".join(summary_lines(m, args.path) + decoded_lines(fs, root, m, args.split, args.decode)))
    except (ManifestError, VerifyError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
