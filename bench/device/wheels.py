"""The wheels a GPU machine without a network needs: what moe_slim requires and its image lacks.

The GPU machines' image (``image_packages.txt``) has torch, transformers 5.17, accelerate, peft, ...
but no pydantic or lm-eval, and no network. This resolves, here where PyPI is reachable, the
closure of moe_slim's requirements (``pyproject.toml``) that the image does not satisfy, reading
every downloaded wheel's ``Requires-Dist`` (markers evaluated for CPython 3.12 on x86-64 Linux),
downloads each at the version ``constraints.txt`` pins (the versions the tests ran with) into one
folder, and checks the folder is complete and small enough to travel (64 MiB, wheels and tree).

A requirement counts as satisfied by the image when the image lists the package and, where the
image's version is known, the version fits the specifier. ``ALWAYS`` packages travel regardless.

    python bench/device/wheels.py [--dir .whl] [--limit-mib 60]   # download, then check
    python bench/device/wheels.py --check-only [--dir .whl]        # read the folder, download nothing
"""

from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
IMAGE = Path(__file__).with_name("image_packages.txt")
#: transformers travels although the image has 5.17: statistics and tests were measured with the
#: pinned release, and its kernels round differently from release to release.
ALWAYS = ("transformers",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
TARGET_ENV = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
                  platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
                  platform_python_implementation="CPython", os_name="posix", extra="")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``constraints.txt`` as {normalised name: version}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[norm(name)] = ver.strip()
    return pins


def read_image(path: Path = IMAGE) -> dict[str, str | None]:
    """The image's packages as {normalised name: version or None when not read}."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[norm(name)] = ver or None
    return out


def needs(req: Requirement, image: dict[str, str | None]) -> str | None:
    """Why ``req`` must travel (None when the image satisfies it or its marker excludes the target)."""
    if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
        return None
    name = norm(req.name)
    if name not in image:
        return "not in the image"
    have = image[name]
    if have is not None and req.specifier and not req.specifier.contains(Version(have), prereleases=True):
        return f"image has {have}, needs {req.specifier}"
    return None


def wheel_metadata(wheel: Path) -> tuple[str, str, list[Requirement]]:
    """(name, version, requirements) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(zf.read(meta).decode())
    return norm(msg["Name"]), msg["Version"], [Requirement(r) for r in msg.get_all("Requires-Dist") or []]


def roots() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def download(name: str, version: str, folder: Path) -> None:
    """One wheel for CPython 3.12 on x86-64 Linux; a pure-Python package published only as an sdist is
    built into a ``py3-none-any`` wheel here (anything else with no wheel is an error)."""
    pip = [sys.executable, "-m", "pip"]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    spec = f"{name}=={version}"
    got = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                          "--implementation", "cp", *platforms, "-d", str(folder), spec],
                         capture_output=True, text=True)
    if got.returncode == 0:
        return
    before = set(folder.glob("*.whl"))
    built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-binary", name, "-w", str(folder), spec],
                           capture_output=True, text=True)
    new = set(folder.glob("*.whl")) - before
    if built.returncode != 0 or not new or not all(w.name.endswith("-none-any.whl") for w in new):
        for w in new:
            w.unlink()
        sys.exit(f"moe-slim: no wheel of {spec} for CPython 3.12 x86-64 ({got.stderr.strip().splitlines()[-1:]})")


def resolve(folder: Path, fetch: bool) -> list[tuple[str, str, str, int]]:
    """Walk the requirements; download (``fetch``) or only read the wheels; return (name, version, why, bytes)."""
    pins, image = read_pins(ROOT / "constraints.txt"), read_image()
    folder.mkdir(parents=True, exist_ok=True)
    have = {wheel_metadata(w)[0]: w for w in folder.glob("*.whl")}
    todo: list[tuple[Requirement, str]] = [(Requirement(n), "kept at the pinned version") for n in ALWAYS]
    todo += [(r, why) for r in roots() if (why := needs(r, image))]
    done: dict[str, tuple[str, str, str, int]] = {}
    while todo:
        req, why = todo.pop(0)
        name = norm(req.name)
        if name in done:
            continue
        if name not in pins:
            sys.exit(f"moe-slim: {name} must travel but constraints.txt pins no version of it")
        wheel = have.get(name)
        if wheel is not None and wheel_metadata(wheel)[1] != pins[name]:
            wheel.unlink()  # another version: two versions of one package stop the whole install
            wheel = None
        if wheel is None:
            if not fetch:
                sys.exit(f"moe-slim: {folder} lacks {name}=={pins[name]} (run bench/device_check_prepare.sh)")
            download(name, pins[name], folder)
            wheel = {wheel_metadata(w)[0]: w for w in folder.glob("*.whl")}[name]
            have[name] = wheel
        _, version, reqs = wheel_metadata(wheel)
        done[name] = (name, version, why, wheel.stat().st_size)
        todo += [(r, f"{why_r} (for {name})") for r in reqs
                 if norm(r.name) not in done and (why_r := needs(r, image))]
    for name, wheel in have.items():
        if name not in done:
            wheel.unlink()  # left from an earlier resolution
    return sorted(done.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(ROOT / ".whl"))
    ap.add_argument("--limit-mib", type=float, default=60.0,
                    help="largest folder (the device tool sends at most 64 MiB: wheels and the tree together)")
    ap.add_argument("--check-only", action="store_true", help="read the folder; download nothing")
    args = ap.parse_args()
    folder = Path(args.dir)
    rows = resolve(folder, fetch=not args.check_only)
    for name, version, why, size in rows:
        print(f"{name + '==' + version:<28s} {size / 2**20:6.2f} MiB  {why}")
    total = sum(r[3] for r in rows)
    print(f"{len(rows)} wheels in {folder}: {total / 2**20:.2f} MiB (limit {args.limit_mib:g} MiB)")
    if total > args.limit_mib * 2**20:
        print(f"moe-slim: {folder} holds {total / 2**20:.1f} MiB, over {args.limit_mib:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
