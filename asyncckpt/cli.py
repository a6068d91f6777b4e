"""The ``asyncckpt`` command: inspect and verify checkpoints from a shell.

Usage::

    asyncckpt ls PATH        # object paths (``model/layer1.weight``), dtypes and shapes, one per line
    asyncckpt ls --keys PATH # the same with the checkpoint keys themselves
    asyncckpt verify PATH    # check every stored checksum
    asyncckpt convert SOURCE DESTINATION --to tf  # a TensorFlow checkpoint tf.train.Checkpoint restores
    asyncckpt convert SOURCE model.safetensors --to safetensors   # and back: --to asyncckpt

``PATH`` is a checkpoint prefix (``runs/ckpt-40``), an ``s3://`` URL, or a directory, meaning the
checkpoint its state file names as latest; TensorFlow checkpoints are read too. Exit status: 0 on success, 1 when the checkpoint is missing or
corrupt (the message names the key and the file), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from asyncckpt import io as ckio
from asyncckpt.errors import CheckpointError
from asyncckpt.readers import load_checkpoint, resolve_checkpoint_path

__all__ = ["main", "build_parser", "readable_name"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncckpt`` command."""
    parser = argparse.ArgumentParser(
        prog="asyncckpt",
        description="Inspect and verify asyncckpt checkpoints.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify",
        help="check every stored checksum of a checkpoint",
        description="Read every value of a checkpoint and check it against its recorded checksum.",
    )
    verify.add_argument("path", metavar="PATH", help="checkpoint prefix, or a directory (its latest checkpoint)")
    listing = commands.add_parser(
        "ls",
        help="list the keys of a checkpoint with their dtypes and shapes",
        description="List every key of a checkpoint with its dtype and shape, sorted by key.",
    )
    listing.add_argument("path", metavar="PATH", help="checkpoint prefix, or a directory (its latest checkpoint)")
    listing.add_argument("--keys", action="store_true",
                         help="print the checkpoint keys themselves instead of the object paths they name")
    convert = commands.add_parser(
        "convert",
        help="write a checkpoint in another format",
        description="Write the checkpoint at SOURCE (asyncckpt's or TensorFlow's) as a TensorFlow checkpoint or a "
                    "safetensors file at DESTINATION, or a .safetensors SOURCE as an asyncckpt checkpoint. "
                    "Nothing existing is overwritten.",
    )
    convert.add_argument("source", metavar="SOURCE", help="checkpoint prefix, or a directory (its latest checkpoint)")
    convert.add_argument("destination", metavar="DESTINATION", help="the new checkpoint's prefix")
    convert.add_argument("--to", choices=["tf", "safetensors", "asyncckpt"], required=True,
                         help="the format to write: tf (TensorFlow), safetensors (one file of the arrays, named by "
                              "object path), asyncckpt (from a .safetensors SOURCE)")
    return parser


def _format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


_ATTRIBUTES = "/.ATTRIBUTES/"
_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def _unescape(segment: str) -> str:
    """A key segment as the name it escapes (``..`` is ``.``, ``.S`` is ``/``)."""
    return segment.replace(".S", "/").replace("..", ".")


def readable_name(key: str) -> str:
    """A checkpoint key as a path of the names a user gave: ``model/.ATTRIBUTES/layer1..weight`` → ``model/layer1.weight``.

    A variable's value is its object's path; other attributes follow their object's path.
    """
    if key.endswith(_VALUE):
        key = key[: -len(_VALUE)]
    return "/".join(_unescape(segment) for segment in key.replace(_ATTRIBUTES, "/").split("/"))


def _ls(path: str, out: TextIO, raw_keys: bool = False) -> int:
    reader = load_checkpoint(path)
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    rows = [
        (key if raw_keys else readable_name(key), "bytes" if dtypes[key].kind == "O" else dtypes[key].name,
         _format_shape(shapes[key]))
        for key in reader.keys()
    ]
    width_key = max((len(r[0]) for r in rows), default=0)
    width_dtype = max((len(r[1]) for r in rows), default=0)
    for key, dtype, shape in rows:
        out.write(f"{key:<{width_key}}  {dtype:<{width_dtype}}  {shape}\n")
    return 0


def _verify(path: str, out: TextIO) -> int:
    prefix = resolve_checkpoint_path(path)
    report = ckio.open_reader(prefix).verify()
    out.write(f"OK: {report.tensors} tensors, {report.bytes} bytes verified\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncckpt`` command with ``argv`` (``sys.argv[1:]`` by default).

    Returns
    -------
    int
        The exit status: 0 success, 1 missing or corrupt checkpoint, 2 usage error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already reported by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        if args.command == "ls":
            return _ls(args.path, sys.stdout, raw_keys=args.keys)
        if args.command == "convert":
            from asyncckpt import convert  # noqa: PLC0415 - only this command needs it

            if args.to == "tf":
                sys.stdout.write(f"wrote TensorFlow checkpoint {convert.to_tensorflow(args.source, args.destination)}\n")
            elif args.to == "safetensors":
                sys.stdout.write(f"wrote {convert.to_safetensors(args.source, args.destination)}\n")
            else:
                sys.stdout.write(f"wrote checkpoint {convert.from_safetensors(args.source, args.destination)}\n")
            return 0
        return _verify(args.path, sys.stdout)
    except CheckpointError as exc:
        kind = "corrupt checkpoint" if isinstance(exc, ValueError) else "error"
        print(f"asyncckpt {args.command}: {kind}: {exc}", file=sys.stderr)
        return 1
    except (OSError, TypeError) as exc:  # a missing file, one not to overwrite, a dtype the format lacks
        print(f"asyncckpt {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
