"""The ``cloudckpt`` command: ls, info, verify, cp, rm, gc, latest (docs/cli.md).

Exit codes: 0 ok, 1 damage or failure, 2 usage (bad arguments or a bad config file). Errors are
one line, ``cloudckpt: error: <message>``, on stderr. ``--json`` prints one JSON document on
stdout for scripts. ``cp`` and ``verify`` show a progress bar (tqdm, if installed) only when
stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .config import CheckpointerConfig, config_reference, resolve_config
from .errors import (
    CheckpointError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
)
from .manager import CheckpointRoot, parse_step
from .protocol.commit import remove_checkpoint
from .protocol.committed import CommittedCheckpoint, open_checkpoint
from .protocol.copy import copy
from .protocol.records import DATA_DIR, INDEX_DIR, MANIFEST_NAME
from .protocol.verify import verify_checkpoint
from .storage.config import StorageConfig
from .storage.interface import Backend, ObjectInfo
from .storage.registry import (
    available_backends,
    backend_class_for,
    known_options,
    resolve,
    split_scheme,
)
from .units import format_size, parse_duration, parse_size

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
CHECKPOINT_ENTRIES = {MANIFEST_NAME, DATA_DIR, INDEX_DIR}
MANIFEST_TEMP_PREFIX = f".{MANIFEST_NAME}.tmp-"  # the local backend's temporary name


class CommandError(Exception):
    """A failure the command reports in one line (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the command's one-line error format (exit 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"cloudckpt: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


# -- shared plumbing ---------------------------------------------------------------------------


@dataclass
class Context:
    """What every subcommand needs: the config, the storage options, output mode."""

    cfg: CheckpointerConfig
    options: dict[str, Any]
    json: bool
    progress: bool
    span: tuple[str, ...] = ()  # the URIs of a command that spans two stores (cp)

    def backend_name(self, uri: str) -> str | None:
        """The config's backend, if it serves ``uri``'s scheme (``cp`` spans two stores)."""
        name = self.cfg.storage.backend
        if name is None:
            return None
        cls = available_backends().get(name)
        if cls is None or not ({split_scheme(uri), "*"} & set(cls.protocols)):
            return None
        return name

    def options_for(self, uri: str) -> dict[str, Any]:
        """The storage options for ``uri``. ``cp`` spans two stores with one option set: each
        side gets the options its backend takes; one that no side takes is still an error."""
        if not self.span:
            return self.options
        sides = [
            known_options(backend_class_for(u, self.backend_name(u)), split_scheme(u))
            for u in (uri, *self.span)
        ]
        here = sides[0]
        if here is None:
            return self.options
        if all(k is not None for k in sides) and any(
            all(key not in k for k in sides if k is not None) for key in self.options
        ):
            return self.options  # resolve() names the option no side takes
        return {k: v for k, v in self.options.items() if k in here}

    def resolve(self, uri: str) -> tuple[Backend, str]:
        return resolve(uri, backend=self.backend_name(uri), storage_options=self.options_for(uri))

    def open(self, uri: str) -> CommittedCheckpoint:
        return open_checkpoint(uri, self.backend_name(uri), self.options_for(uri))

    def root(self, uri: str | None) -> CheckpointRoot:
        uri = uri or self.cfg.storage.root
        if not uri:
            raise ConfigError("no ROOT given and no [storage] root in the config: pass ROOT")
        return CheckpointRoot(uri, self.backend_name(uri), self.options)


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs: VALUE as JSON if it parses (``20``, ``true``), else a string;
    dots in KEY nest (``client_kwargs.region_name=eu``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            # never echo the text: it may be a credential typed without its key
            raise ConfigError(
                f"--storage-option expects KEY=VALUE, got {len(pair)} characters without '=' "
                "(or with an empty KEY); write e.g. --storage-option endpoint_url=http://host:9000"
            )
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--storage-option {key}: {p!r} is set to a plain value by another "
                    "--storage-option and cannot also hold nested keys"
                )
        node[leaf] = value
    return out


class _Progress:
    """A byte counter drawn by tqdm when enabled and installed; thread-safe; else silent."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        self._lock = threading.Lock()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                return
            # a terminal that reports a 0x0 size (a bare pty) would get no bar at all from tqdm
            size = shutil.get_terminal_size()
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                leave=False,
                ncols=size.columns,
                nrows=size.lines,
            )

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")


def _time(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


# -- ls, info, latest --------------------------------------------------------------------------


def cmd_ls(ctx: Context, args: argparse.Namespace) -> int:
    root = ctx.root(args.root)
    rows: list[dict[str, Any]] = []
    entries = root.entries()
    for info in entries:
        if not info.is_dir:
            continue
        ck = root.open_committed(info.name)  # a damaged one: one warning, then the others
        if ck is None:
            continue  # only committed checkpoints are listed
        m = ck.manifest
        rows.append(
            {
                "name": info.name,
                "uri": ck.uri,
                "step": parse_step(info.name),
                "bytes": m.total_bytes,
                "world_size": m.world_size,
                "created": _time(m.created_unix),
                "created_unix": m.created_unix,
            }
        )
    rows.sort(key=lambda r: (r["step"] is None, r["step"] or 0, r["name"]))
    if not rows:
        _say_empty(root, entries, exit_if_missing=True)
    if ctx.json:
        _print_json(rows)
    else:
        for r in rows:
            step = "-" if r["step"] is None else str(r["step"])
            sys.stdout.write(
                f"{step:>10}  {format_size(r['bytes']):>10}  {r['created']}  {r['uri']}\n"
            )
    return EXIT_OK


def cmd_info(ctx: Context, args: argparse.Namespace) -> int:
    ck = ctx.open(args.uri)
    m = ck.manifest
    ranks: list[dict[str, Any]] = []
    for entry in m.ranks:
        idx = ck.read_index(entry.rank)
        ranks.append(
            {
                "rank": entry.rank,
                "files": len(idx.files),
                "tensors": len(idx.tensors),
                "bytes": sum(f.size for f in idx.files),
            }
        )
    doc: dict[str, Any] = {
        "uri": ck.uri,
        "world_size": m.world_size,
        "files": sum(r["files"] for r in ranks),
        "tensors": sum(r["tensors"] for r in ranks),
        "bytes": sum(r["bytes"] for r in ranks),
        "created": _time(m.created_unix),
        "library_version": m.library_version,
        "metadata": m.metadata,
        "ranks": ranks,
    }
    if ctx.json:
        _print_json(doc)
        return EXIT_OK
    out = [
        f"uri:       {doc['uri']}",
        f"created:   {doc['created']} (cloudckpt {m.library_version or '?'})",
        f"ranks:     {m.world_size}",
        f"files:     {doc['files']}",
        f"tensors:   {doc['tensors']}",
        f"bytes:     {doc['bytes']} ({format_size(doc['bytes'])})",
    ]
    if m.metadata:
        out.append(f"metadata:  {json.dumps(m.metadata)}")
    out += [
        f"  rank {r['rank']}: {r['files']} files, {r['tensors']} tensors, {format_size(r['bytes'])}"
        for r in ranks
    ]
    sys.stdout.write("\n".join(out) + "\n")
    return EXIT_OK


def _say_empty(root: CheckpointRoot, entries: list[ObjectInfo], exit_if_missing: bool) -> None:
    """Nothing committed under ``root``: a path that does not exist fails (``ls``, ``latest``);
    one that exists but holds no checkpoint is said on stderr."""
    if not entries and not root.backend.exists(root.path):
        if exit_if_missing:
            raise CheckpointNotFoundError(
                f"{root.root}: nothing is stored there (no such directory or prefix); check ROOT"
            )
        sys.stderr.write(f"cloudckpt: {root.root}: nothing is stored there\n")
        return
    sys.stderr.write(f"cloudckpt: no committed checkpoint under {root.root}\n")


def cmd_latest(ctx: Context, args: argparse.Namespace) -> int:
    root = ctx.root(args.root)
    latest = root.latest()
    if latest is None:
        entries = root.entries()
        if not entries and not root.backend.exists(root.path):
            _say_empty(root, entries, exit_if_missing=True)
        raise CheckpointNotFoundError(
            f"no committed checkpoint under {root.root}; check ROOT (cloudckpt ls {root.root})"
        )
    uri = root.uri_of(latest[1])
    if ctx.json:
        _print_json({"uri": uri, "step": latest[0]})
    else:
        sys.stdout.write(uri + "\n")
    return EXIT_OK


# -- verify ------------------------------------------------------------------------------------


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    ck = ctx.open(args.uri)
    bar = _Progress(ck.manifest.total_bytes, "verify", ctx.progress)
    try:
        r = verify_checkpoint(ck, bar.update)
    finally:
        bar.close()
    stats = {"ranks": r.ranks, "files": r.files, "tensors": r.tensors, "bytes": r.bytes}
    if ctx.json:
        _print_json({"uri": ck.uri, "ok": r.ok, "problems": r.problems, **stats})
    else:
        for p in r.problems:
            sys.stdout.write(p + "\n")
        if r.ok:
            sys.stdout.write(
                f"ok: {ck.uri}: {r.ranks} ranks, {r.files} files, "
                f"{r.tensors} tensors, {format_size(r.bytes)} checked\n"
            )
    if not r.ok:
        raise CommandError(
            f"{ck.uri} is damaged: {len(r.problems)} problem(s); load an earlier checkpoint "
            "or copy it again from a good one"
        )
    return EXIT_OK


# -- cp, rm ------------------------------------------------------------------------------------


def cmd_cp(ctx: Context, args: argparse.Namespace) -> int:
    if args.src.rstrip("/") == args.dst.rstrip("/"):
        raise CommandError("SRC and DST are the same checkpoint")
    ctx.span = (args.src, args.dst)
    try:
        total = ctx.open(args.src).manifest.total_bytes
    except CheckpointNotCommittedError:
        return _convert_upstream(ctx, args)
    bar = _Progress(total, "cp", ctx.progress)
    try:
        report = copy(
            args.src,
            args.dst,
            overwrite=args.overwrite,
            storage_options=ctx.options_for(args.src),
            dst_storage_options=ctx.options_for(args.dst),
            backend=ctx.backend_name(args.src),
            dst_backend=ctx.backend_name(args.dst),
            concurrency=ctx.cfg.writer_config.concurrency,
            on_bytes=bar.update,
        )
    finally:
        bar.close()
    doc: dict[str, Any] = {
        "src": report.src,
        "dst": report.dst,
        "files": report.files,
        "bytes": report.bytes,
    }
    if ctx.json:
        _print_json(doc)
    else:
        sys.stdout.write(
            f"copied {doc['src']} -> {doc['dst']} ({doc['files']} files, "
            f"{format_size(doc['bytes'])})\n"
        )
    return EXIT_OK


def cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    from .export import export  # tensors: the only command that imports torch

    ctx.span = (args.uri, args.dst)  # two stores, one option set: each side takes its own
    src = ctx.open(args.uri)
    dst, dst_root = ctx.resolve(args.dst)
    report = export(
        src,
        dst,
        dst_root,
        args.dst,
        prefix=args.prefix,
        rank=args.rank,
        max_file_bytes=args.max_file_size,
        overwrite=args.overwrite,
        concurrency=ctx.cfg.writer_config.concurrency,
    )
    if ctx.json:
        _print_json(vars(report))
    else:
        sys.stdout.write(
            f"exported {report.tensors} tensors ({format_size(report.bytes)}) from {report.src} "
            f"to {report.dst}: {len(report.files)} safetensors file(s) + "
            "model.safetensors.index.json\n"
        )
    return EXIT_OK


def _convert_upstream(ctx: Context, args: argparse.Namespace) -> int:
    """``cp`` of a directory in the upstream layout (``checkpoint_{rank}.pt``, no manifest):
    load each rank's file (``weights_only``) and save it as a committed checkpoint."""
    from . import legacy  # imports torch, which only this case needs

    backend, root = ctx.resolve(args.src)
    if not legacy.legacy_ranks(backend, root):
        ctx.open(args.src)  # not upstream either: the not-committed error, as before
    report = legacy.convert(
        backend,
        root,
        args.src,
        args.dst,
        overwrite=args.overwrite,
        writer_config=ctx.cfg.writer_config,
        storage=StorageConfig(
            backend=ctx.backend_name(args.dst), options=ctx.options_for(args.dst)
        ),
    )
    if ctx.json:
        _print_json(vars(report))
    else:
        sys.stdout.write(
            f"converted {report.src} -> {report.dst} ({report.ranks} rank file(s) in the "
            "upstream layout, now committed)\n"
        )
    return EXIT_OK


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _checkpoint_entries(backend: Backend, path: str) -> set[str] | None:
    """The names directly under ``path`` if it looks like a checkpoint (only manifest.json,
    data/, index/ and a temporary manifest a killed commit left), else ``None``."""
    names = {i.name for i in backend.list_dir(path)}
    own = {n for n in names if n in CHECKPOINT_ENTRIES or n.startswith(MANIFEST_TEMP_PREFIX)}
    return names if names and names == own else None


def cmd_rm(ctx: Context, args: argparse.Namespace) -> int:
    backend, path = ctx.resolve(args.uri)
    names = _checkpoint_entries(backend, path)
    if names is None:
        if not backend.list_dir(path):
            raise CheckpointNotFoundError(f"no checkpoint at {args.uri}: nothing to remove")
        raise CommandError(
            f"{args.uri} is not a checkpoint (it holds more than manifest.json, data/ and "
            "index/); refusing to remove it. Use your store's own tools."
        )
    committed = MANIFEST_NAME in names
    remove_checkpoint(backend, path, args.uri)
    if ctx.json:
        _print_json({"removed": args.uri, "committed": committed})
    else:
        sys.stdout.write(f"removed {args.uri}{'' if committed else ' (was not committed)'}\n")
    return EXIT_OK


# -- gc ----------------------------------------------------------------------------------------


def cmd_gc(ctx: Context, args: argparse.Namespace) -> int:
    root = ctx.root(args.root)
    min_age = parse_duration(args.older_than)
    actions: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    if args.keep_last is not None or args.keep_every is not None:
        for step, name in root.retention_victims(args.keep_last, args.keep_every).items():
            actions.append(
                {"uri": root.uri_of(name), "step": step, "reason": "retention", "name": name}
            )
    victims = {a["name"] for a in actions}
    now = time.time()
    entries = root.entries()
    if not entries:
        _say_empty(root, entries, exit_if_missing=False)
    for info in entries:
        if not info.is_dir or parse_step(info.name) is None or info.name in victims:
            continue  # only the step-N directories a manager writes; the rest is the user's
        if _checkpoint_entries(root.backend, info.path) is None:
            continue  # not checkpoint-shaped
        uri = root.uri_of(info.name)
        try:
            report = root.collect_orphans(info.name, min_age, dry_run=args.dry_run)
        except CorruptCheckpointError as e:
            skipped.append({"uri": uri, "reason": f"manifest damaged, nothing removed: {e}"})
            continue
        state = "uncommitted" if not report.committed else "orphan of a committed checkpoint"
        for g in report.removed:
            newest = g.newest or now
            what = f"attempt {g.name}" if g.name else "objects of no attempt"
            actions.append(
                {
                    "uri": uri,
                    "step": parse_step(info.name),
                    "reason": f"{state}: {what}, {len(g.objects)} object(s), "
                    f"{now - newest:.0f}s old",
                    "objects": [root.backend.to_uri(o.path) for o in g.objects],
                }
            )
        for g in report.kept:
            kept_newest = g.newest
            age = "unknown age" if kept_newest is None else f"{now - kept_newest:.0f}s old"
            what = f"attempt {g.name}" if g.name else "objects of no attempt"
            skipped.append(
                {"uri": uri, "reason": f"{state}: {what}, {age}, younger than --older-than"}
            )
    for a in actions:
        if a["reason"] == "retention" and not args.dry_run:
            root.remove(a["name"])
        if not ctx.json:
            verb = "would remove" if args.dry_run else "removed"
            what = "" if a["reason"] == "retention" else "orphans under "
            sys.stdout.write(f"{verb} {what}{a['uri']} ({a['reason']})\n")
    if ctx.json:
        _print_json(
            {
                "root": root.root,
                "dry_run": args.dry_run,
                "removed": [
                    {k: a[k] for k in ("uri", "step", "reason", "objects") if k in a}
                    for a in actions
                ],
                "skipped": skipped,
            }
        )
    else:
        for s in skipped:
            what = "" if s["reason"].startswith("manifest damaged") else "orphans under "
            sys.stdout.write(f"kept {what}{s['uri']} ({s['reason']})\n")
    return EXIT_OK


def cmd_config_reference(ctx: Context, args: argparse.Namespace) -> int:
    sys.stdout.write(config_reference())
    return EXIT_OK


# -- parser and main ---------------------------------------------------------------------------


def _count(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return n


def _duration(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: given before or after COMMAND, the subcommand's defaults must not undo it
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $CLOUDCKPT_CONFIG)",
    )
    common.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        default=argparse.SUPPRESS,
        help="storage option over the config's [storage.options] (repeatable; VALUE as JSON "
        "if it parses; dotted KEY nests)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts"
    )
    parser = _Parser(
        prog="cloudckpt",
        description="Inspect, verify, copy and clean up cloudckpt checkpoints on any store.",
        epilog="Exit codes: 0 ok, 1 damage or failure, 2 usage. See docs/cli.md.",
        parents=[common],
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def add(name: str, func: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    root_help = "URI of the directory holding checkpoints (default: [storage] root)"
    p = add("ls", cmd_ls, "list the committed checkpoints under ROOT: step, size, time, URI")
    p.add_argument("root", nargs="?", metavar="ROOT", help=root_help)
    p = add("info", cmd_info, "describe a checkpoint: ranks, files, tensors, bytes, metadata")
    p.add_argument("uri", metavar="URI")
    p = add(
        "verify",
        cmd_verify,
        "read every object of every rank and check every CRC32C and safetensors header "
        "(exit 1 on damage)",
    )
    p.add_argument("uri", metavar="URI")
    p = add(
        "cp",
        cmd_cp,
        "copy a committed checkpoint between any two stores; the manifest is written last",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at DST")
    p = add(
        "export",
        cmd_export,
        "write the checkpoint's tensors, consolidated, as safetensors files plus "
        "model.safetensors.index.json (Hugging Face layout) at DST, any store to any store",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("dst", metavar="DST", help="directory URI to write the files under")
    p.add_argument(
        "--prefix",
        default="",
        help="export only key paths starting with PREFIX, named without it (e.g. model.)",
    )
    p.add_argument(
        "--rank", type=int, default=None, help="whose per-rank tensors to export (many ranks)"
    )
    p.add_argument(
        "--max-file-size",
        type=_size,
        default=5 << 30,
        metavar="SIZE",
        help="largest output file (default 5GiB; units KiB, MiB, GiB)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an export at DST")
    p = add("rm", cmd_rm, "remove one checkpoint (committed or not), manifest first")
    p.add_argument("uri", metavar="URI")
    p = add(
        "gc",
        cmd_gc,
        "apply retention to the step-N checkpoints under ROOT and remove orphans under them "
        "(objects no manifest names: killed saves, lost races, interrupted overwrites; all of "
        "an uncommitted one) once older than --older-than",
    )
    p.add_argument("root", nargs="?", metavar="ROOT", help=root_help)
    p.add_argument("--keep-last", type=_count, metavar="N", help="keep the N newest committed")
    p.add_argument("--keep-every", type=_count, metavar="M", help="also keep steps divisible by M")
    p.add_argument(
        "--older-than",
        type=_duration,
        default="1d",
        metavar="AGE",
        help="remove orphans only when nothing of their save attempt changed for AGE "
        "(default 1d; units s, m, h, d, w), so a save in progress is never raced",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be removed")
    p = add("latest", cmd_latest, "print the URI of the newest committed checkpoint under ROOT")
    p.add_argument("root", nargs="?", metavar="ROOT", help=root_help)
    add(
        "config-reference",
        cmd_config_reference,
        "print the reference of every config key (docs/config-reference.md)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="cloudckpt: %(message)s")
    try:
        try:
            options = parse_storage_options(getattr(args, "storage_option", []))
        except ValueError as e:
            parser.error(str(e))
        cfg = resolve_config(getattr(args, "config", None))
        as_json = bool(getattr(args, "json", False))
        ctx = Context(
            cfg=cfg,
            options=cfg.storage.options_with(options),
            json=as_json,
            progress=sys.stderr.isatty() and not as_json,
        )
        return int(args.func(ctx, args))
    except ConfigError as e:
        return _fail(e, EXIT_USAGE)
    except (CheckpointError, CommandError, OSError, EOFError, ValueError) as e:
        return _fail(e, EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        if os.environ.get("CLOUDCKPT_DEBUG"):
            raise
        return _fail(f"{type(e).__name__}: {e} (set CLOUDCKPT_DEBUG=1 for a traceback)", 1)


def _fail(error: object, code: int) -> int:
    message = " ".join(str(error).split()) or type(error).__name__
    sys.stderr.write(f"cloudckpt: error: {message}\n")
    return code
