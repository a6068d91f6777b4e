"""The ``asyncckpt`` command: inspect and verify checkpoints from a shell.

Usage::

    asyncckpt ls PATH        # object paths (``model/layer1.weight``), dtypes and shapes, one per line
    asyncckpt ls --keys PATH # the same with the checkpoint keys themselves
    asyncckpt show PATH KEY  # dtype, shape, min/max/mean, first elements of one value
    asyncckpt verify PATH    # check every stored checksum
    asyncckpt diff A B       # keys added (+), removed (-), changed (~, with the largest difference)
    asyncckpt latest DIR     # the latest checkpoint of a directory
    asyncckpt du PATH        # bytes per top-level object
    asyncckpt convert SOURCE DESTINATION --to tf  # a TensorFlow checkpoint tf.train.Checkpoint restores
    asyncckpt convert SOURCE model.safetensors --to safetensors   # and back: --to asyncckpt

``PATH`` is a checkpoint prefix (``runs/ckpt-40``), an ``s3://`` URL, or a directory, meaning the
checkpoint its state file names as latest; TensorFlow checkpoints are read too. Exit status: 0 on success, 1 when the checkpoint is missing or
corrupt (the message names the key and the file), 2 on a usage error; ``diff`` exits 3 when the
checkpoints differ. ``--json`` prints any command's result (or error) as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence, TextIO

from asyncckpt import io as ckio
import numpy as np

from asyncckpt.checkpoint_management import latest_checkpoint
from asyncckpt.errors import CheckpointError, NotFoundError
from asyncckpt.naming import readable_name
from asyncckpt.progress import for_terminal
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
    show = commands.add_parser(
        "show",
        help="one value: dtype, shape, min/max/mean and its first elements",
        description="Show one value of a checkpoint: dtype, shape, min, max, mean and its first elements.",
    )
    show.add_argument("path", metavar="PATH", help="checkpoint prefix, or a directory (its latest checkpoint)")
    show.add_argument("key", metavar="KEY", help="the object path (as ls prints it) or the checkpoint key")
    show.add_argument("--first", type=int, default=8, metavar="N", help="how many elements to print (default 8)")
    diff = commands.add_parser(
        "diff",
        help="keys added, removed and changed between two checkpoints",
        description="Compare two checkpoints key by key: added, removed, and changed (dtype, shape, or values, "
                    "with the largest absolute difference). Exit status 0 when equal, 3 when they differ.",
    )
    diff.add_argument("first", metavar="A")
    diff.add_argument("second", metavar="B")
    latest = commands.add_parser("latest", help="the latest checkpoint of a directory",
                                 description="Print the latest checkpoint the directory's state file names.")
    latest.add_argument("path", metavar="DIR")
    usage = commands.add_parser("du", help="bytes per top-level object",
                                description="Bytes stored per top-level object of a checkpoint, largest first.")
    usage.add_argument("path", metavar="PATH", help="checkpoint prefix, or a directory (its latest checkpoint)")
    convert = commands.add_parser(
        "convert",
        help="write a checkpoint in another format",
        description="Write the checkpoint at SOURCE (asyncckpt's or TensorFlow's) as a TensorFlow checkpoint, a "
                    "safetensors file or a torch state dict at DESTINATION, or a .safetensors or .pt SOURCE as an "
                    "asyncckpt checkpoint. Nothing existing is overwritten; .pt files are read with "
                    "weights_only=True.",
    )
    convert.add_argument("source", metavar="SOURCE", help="checkpoint prefix, or a directory (its latest checkpoint)")
    convert.add_argument("destination", metavar="DESTINATION", help="the new checkpoint's prefix")
    convert.add_argument("--to", choices=["tf", "safetensors", "pt", "asyncckpt"], required=True,
                         help="the format to write: tf (TensorFlow), safetensors or pt (one file of the arrays, "
                              "named by object path), asyncckpt (from a .safetensors or torch .pt SOURCE)")
    for command in commands.choices.values():
        command.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _format_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _resolved(path: str) -> tuple[str, str | None]:
    """``(checkpoint prefix, note)``: a directory resolves to its latest checkpoint, and the note says which."""
    prefix = resolve_checkpoint_path(path)
    return prefix, (None if prefix == path else f"latest checkpoint of {path}: {prefix}")


def _ls(args) -> tuple[int, dict, list[str]]:
    prefix, note = _resolved(args.path)
    reader = load_checkpoint(prefix)
    dtypes, shapes = reader.get_variable_to_dtype_map(), reader.get_variable_to_shape_map()
    rows = [{"key": key, "name": readable_name(key), "dtype": _dtype_name(dtypes[key]), "shape": shapes[key]}
            for key in reader.keys()]
    shown = [(row["key"] if args.keys else row["name"], row["dtype"], _format_shape(row["shape"])) for row in rows]
    width_key = max((len(r[0]) for r in shown), default=0)
    width_dtype = max((len(r[1]) for r in shown), default=0)
    lines = ([note] if note else []) + [f"{key:<{width_key}}  {dtype:<{width_dtype}}  {shape}" for key, dtype, shape in shown]
    return 0, {"checkpoint": prefix, "values": rows}, lines


def _dtype_name(dtype) -> str:
    return "bytes" if dtype.kind == "O" else dtype.name


def _verify(args) -> tuple[int, dict, list[str]]:
    prefix, note = _resolved(args.path)
    reader = ckio.open_reader(prefix)
    reader.on_progress = progress = for_terminal(sys.stderr, "verify")  # a progress line on a terminal only
    try:
        report = reader.verify()
    finally:
        if progress is not None:
            progress.close()
    lines = ([note] if note else []) + [f"OK: {report.tensors} tensors, {report.bytes} bytes verified"]
    return 0, {"checkpoint": prefix, "ok": True, "tensors": report.tensors, "bytes": report.bytes}, lines


def _key_of(reader, key: str) -> str:
    """The checkpoint key ``key`` names: itself, or the key whose object path it is."""
    if key in reader:
        return key
    matches = [candidate for candidate in reader.keys() if readable_name(candidate) == key]
    if not matches:
        raise KeyError(f"no key or object path {key!r} in checkpoint {reader.path}")
    return matches[0]


def _summary(value, first: int) -> dict:
    if isinstance(value, bytes):
        return {"dtype": "bytes", "shape": [], "length": len(value), "first": value[:first].decode("latin-1")}
    array = np.asarray(value)
    summary = {"dtype": _dtype_name(array.dtype), "shape": list(array.shape), "size": int(array.size)}
    if array.size and (array.dtype.kind in "biufc" or str(array.dtype) == "bfloat16"):
        wide = array.astype(np.complex128 if array.dtype.kind == "c" else np.float64)
        summary.update(min=_plain(wide.min()), max=_plain(wide.max()), mean=_plain(wide.mean()))
    summary["first"] = [_plain(item) for item in array.reshape(-1)[:first].tolist()]
    return summary


def _plain(item):
    if isinstance(item, complex):
        return [item.real, item.imag]
    if isinstance(item, (np.generic,)):
        return item.item()
    if isinstance(item, bytes):
        return item.decode("latin-1")
    return item


def _show(args) -> tuple[int, dict, list[str]]:
    prefix, note = _resolved(args.path)
    reader = load_checkpoint(prefix)
    key = _key_of(reader, args.key)
    summary = {"checkpoint": prefix, "key": key, **_summary(reader.get_tensor(key), max(args.first, 0))}
    lines = ([note] if note else []) + [f"{key}", f"  dtype {summary['dtype']}  shape {_format_shape(summary['shape'])}"]
    if "min" in summary:
        lines.append(f"  min {summary['min']}  max {summary['max']}  mean {summary['mean']}")
    lines.append(f"  first {summary['first']}")
    return 0, summary, lines


def _diff(args) -> tuple[int, dict, list[str]]:
    first, second = (load_checkpoint(resolve_checkpoint_path(path)) for path in (args.first, args.second))
    keys_a = {key for key in first.keys() if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    keys_b = {key for key in second.keys() if key != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    changed = []
    for key in sorted(keys_a & keys_b):
        spec_a, spec_b = first.spec(key), second.spec(key)
        if (str(spec_a.dtype), spec_a.shape) != (str(spec_b.dtype), spec_b.shape):
            changed.append({"key": key, "was": f"{spec_a.dtype}{list(spec_a.shape)}",
                            "now": f"{spec_b.dtype}{list(spec_b.shape)}"})
            continue
        a, b = first.get_tensor(key), second.get_tensor(key)
        if isinstance(a, bytes) or isinstance(b, bytes) or np.asarray(a).dtype.kind == "O":
            if a != b if isinstance(a, bytes) else not np.array_equal(a, b):
                changed.append({"key": key, "max_abs_difference": None})
            continue
        if np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(b).tobytes():  # bit for bit (NaNs, -0.0)
            wide_a, wide_b = (np.asarray(x).astype(np.complex128 if np.asarray(x).dtype.kind == "c" else np.float64)
                              for x in (a, b))
            biggest = float(np.max(np.abs(wide_a - wide_b))) if wide_a.size else 0.0
            changed.append({"key": key, "max_abs_difference": biggest})
    result = {"added": sorted(keys_b - keys_a), "removed": sorted(keys_a - keys_b), "changed": changed}
    lines = [f"+ {key}" for key in result["added"]] + [f"- {key}" for key in result["removed"]]
    for change in changed:
        detail = (f"{change['was']} -> {change['now']}" if "was" in change
                  else f"max |a - b| = {change['max_abs_difference']}")
        lines.append(f"~ {change['key']}: {detail}")
    same = not (result["added"] or result["removed"] or changed)
    result["equal"] = same
    return (0 if same else 3), result, (lines or ["equal"])


def _latest(args) -> tuple[int, dict, list[str]]:
    found = latest_checkpoint(args.path)
    if found is None:
        raise NotFoundError(f"no checkpoint recorded in {args.path}")
    return 0, {"directory": args.path, "latest": found}, [found]


def _du(args) -> tuple[int, dict, list[str]]:
    prefix, note = _resolved(args.path)
    reader = load_checkpoint(prefix)
    sizes: dict[str, int] = {}
    for key in reader.keys():
        if key == "_CHECKPOINTABLE_OBJECT_GRAPH":
            continue
        nbytes = reader.stored_bytes(key)
        top = readable_name(key).split("/")[0]
        sizes[top] = sizes.get(top, 0) + nbytes
    rows = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
    width = max((len(str(size)) for _, size in rows), default=0)
    lines = ([note] if note else []) + [f"{size:>{width}}  {name}" for name, size in rows]
    return 0, {"checkpoint": prefix, "bytes": dict(rows), "total": sum(sizes.values())}, lines


def _convert(args) -> tuple[int, dict, list[str]]:
    from asyncckpt import convert  # noqa: PLC0415 - only this command needs it

    if args.to == "tf":
        written, what = convert.to_tensorflow(args.source, args.destination), "TensorFlow checkpoint"
    elif args.to == "safetensors":
        written, what = convert.to_safetensors(args.source, args.destination), "safetensors file"
    elif args.to == "pt":
        written, what = convert.to_torch(args.source, args.destination), "torch state dict"
    else:
        written, what = convert.from_file(args.source, args.destination), "checkpoint"
    return 0, {"written": written, "format": args.to}, [f"wrote {what} {written}"]


_COMMANDS = {"ls": _ls, "verify": _verify, "show": _show, "diff": _diff, "latest": _latest, "du": _du,
             "convert": _convert}


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
        code, data, lines = _COMMANDS[args.command](args)
    except (CheckpointError, KeyError) as exc:
        kind = "corrupt checkpoint" if isinstance(exc, ValueError) else "error"
        return _failed(args, kind, exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    except (OSError, TypeError, ValueError) as exc:  # a missing file, one not to overwrite, a dtype a format lacks
        return _failed(args, "error", exc)
    if args.json:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        sys.stdout.write("".join(f"{line}\n" for line in lines))
    return code


def _failed(args, kind: str, error) -> int:
    print(f"asyncckpt {args.command}: {kind}: {error}", file=sys.stderr)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps({"error": str(error), "kind": kind}) + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
