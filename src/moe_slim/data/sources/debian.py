"""Gettext catalogs from Debian packages, downloaded (not installed) at data-build time.

``apt-get download`` fetches each package's ``.deb`` into a cache (``~/.cache/moe_slim/debs`` or
``$MOE_SLIM_DEB_CACHE``); only the ``<lang>/LC_MESSAGES/*.mo`` members for the target languages
are extracted (``dpkg-deb --fsys-tarfile``), into ``<cache>/extract/<package>_<version>/``, which
is laid out like a locale directory. A cached package is never downloaded again, so a second
build is offline. Nothing is installed.

The packages ``nano``, ``gawk``, ``cpio``, ``vim-common`` and ``vim-runtime`` are reserved for the
project's out-of-distribution evaluation: they are refused by name, and their catalogs (``nano``,
``gawk``, ``cpio``, ``vim``) are dropped wherever they come from, installed locale dirs included.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ...errors import MoeSlimError
from .base import MAX_MEMBER_BYTES, Warn, _no_warn

HELD_OUT_PACKAGES: tuple[str, ...] = ("cpio", "gawk", "nano", "vim-common", "vim-runtime")
HELD_OUT_CATALOGS: tuple[str, ...] = ("cpio", "gawk", "nano", "vim")
ENV_CACHE = "MOE_SLIM_DEB_CACHE"

# Debian 12 packages that ship .mo catalogs for de, fr and es (checked: each has some).
DEBIAN_PACKAGES: tuple[str, ...] = tuple(sorted("""
a2ps accountsservice adduser alsa-utils apt apt-listchanges aptitude-common aspell atril-common
audacious-plugins-data baobab bash binutils-common bison blueman brasero-common caja-common catfish
cheese-common claws-mail-i18n coreutils cryptsetup-bin debconf-i18n dialog diffutils dpkg
e2fsprogs-l10n easytag engrampa-common enscript eom-common evince-common file-roller filezilla-common
findutils flex galculator gcc-12-locales geany-common gedit-common gettext gettext-base ghex gigolo
git gnome-calculator gnome-control-center-data gnome-disk-utility gnome-logs gnome-session-common
gnome-settings-daemon-common gnome-shell-common gnome-system-monitor gnome-terminal-data
gnumeric-common gnupg-l10n grep grub-common gthumb-data guake gucharmap homebank-data hunspell indent
kbd lftp libapt-pkg6.0 libavahi-common-data libc-l10n libexif12 libextractor3 libglib2.0-data
libgnomekbd-common libgpg-error-l10n libgphoto2-l10n libgsf-1-common libgtk-3-common libgtk2.0-common
libgtop2-common libidn2-0 libnewt0.52 libpwquality-common libwnck-3-common libxfce4ui-common
libxfce4util-common lightdm lightdm-gtk-greeter login lxpanel-data lxterminal lynx-common m4
mailutils-common make man-db mate-panel-common mc-data meld mercurial-common mousepad mutt
mutter-common nautilus-data needrestart net-tools network-manager network-manager-gnome parole
pavucontrol pcmanfm pidgin-data pluma-common polkitd procps psmisc pulseaudio recode remmina-common
rhythmbox-data ristretto seahorse sed sharutils sound-juicer sudo sylpheed-i18n synaptic
system-config-printer-common systemd tar tasksel-data terminator texinfo thunar-data thunar-volman
tilix-common totem-common tumbler-common udisks2 upower util-linux-locales wdiff wget whois xarchiver
xdg-user-dirs xfburn xfce4-appfinder xfce4-notifyd xfce4-panel xfce4-screenshooter xfce4-session
xfce4-settings xfce4-taskmanager xfce4-terminal xfdesktop4-data xfwm4 xz-utils zenity-common
""".split()))


@dataclass(frozen=True)
class DebCatalogs:
    """One downloaded package: where its catalogs were extracted (a locale directory)."""

    package: str
    version: str
    sha256: str
    root: Path

    @property
    def label(self) -> str:
        return f"deb:{self.package}_{self.version}"

    def to_json(self) -> dict:
        return {"package": self.package, "version": self.version, "sha256": self.sha256}


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "moe_slim" / "debs"


def is_held_out_catalog(path: str | os.PathLike) -> bool:
    """True for a catalog reserved for the out-of-distribution evaluation (by its domain name)."""
    return Path(path).stem in HELD_OUT_CATALOGS


def check_packages(packages: Iterable[str]) -> tuple[str, ...]:
    """The package names, sorted and unique; a held-out or malformed name is a one-line error."""
    names = tuple(sorted(set(packages)))
    held = [p for p in names if p in HELD_OUT_PACKAGES]
    if held:
        raise MoeSlimError(f"package(s) {', '.join(held)} are reserved for the out-of-distribution evaluation "
                           f"and never used for data ({', '.join(HELD_OUT_PACKAGES)}); drop them from --packages")
    bad = [p for p in names if not re.fullmatch(r"[a-z0-9][a-z0-9+.\-]+", p)]
    if bad:
        raise MoeSlimError(f"not a Debian package name: {', '.join(bad)}")
    return names


def _deb_fields(path: Path) -> tuple[str, str]:
    """The package's name and version; a file dpkg-deb cannot read is a one-line error naming it."""
    res = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version"], capture_output=True, text=True)
    fields = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines() if ": " in line)
    if res.returncode != 0 or not {"Package", "Version"} <= set(fields):
        reason = (res.stderr.strip().splitlines() or ["no Package and Version fields"])[-1]
        raise MoeSlimError(f"{path} is not a readable Debian package ({reason.removeprefix('dpkg-deb: ')}); "
                           "delete it from the cache and rebuild")
    return fields["Package"], fields["Version"]


def _sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (a package is never read whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached_debs(deb_dir: Path) -> dict[str, Path]:
    """Package name -> its .deb in the cache (the newest file name when there are several)."""
    found: dict[str, Path] = {}
    for p in sorted(deb_dir.glob("*.deb")):
        found[p.name.split("_", 1)[0]] = p
    return found


def _download(packages: list[str], deb_dir: Path, warn: Warn) -> None:
    if shutil.which("apt-get") is None:
        warn(f"apt-get not found: {len(packages)} Debian package(s) not downloaded")
        return
    cmd = ["apt-get", "download", "-q"]
    res = subprocess.run(cmd + packages, cwd=deb_dir, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:  # one unknown package fails the batch: retry one by one
        for p in packages:
            r = subprocess.run(cmd + [p], cwd=deb_dir, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no message"])[-1]
                warn(f"could not download Debian package {p}: {last}")


_MO_MEMBER = re.compile(r"(?:^|/)locale(?:-langpack)?/([a-z]{2})(?:_[A-Z]{2})?/LC_MESSAGES/([^/]+\.mo)$")


def _extract(deb: Path, dest: Path, langs: tuple[str, ...]) -> None:
    """The deb's ``<lang>/LC_MESSAGES/*.mo`` members (regular files only) into ``dest``, atomically."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                match = _MO_MEMBER.search(m.name)
                if not m.isfile() or not match or match.group(1) not in langs:
                    continue
                out = tmp / match.group(1) / "LC_MESSAGES" / match.group(2)
                if out.exists():
                    continue
                if m.size > MAX_MEMBER_BYTES:  # no real catalog is this large: never read it (a crafted package)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                f = tar.extractfile(m)
                with open(out, "wb") as fh:
                    if f is not None:
                        shutil.copyfileobj(f, fh, 1 << 20)
    except tarfile.TarError as exc:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoeSlimError(f"dpkg-deb could not read {deb} ({exc}); delete it from the cache and rebuild") from None
    finally:
        proc.stdout.close()
        if proc.wait() != 0 and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise MoeSlimError(f"dpkg-deb could not read {deb} (delete it from the cache and rebuild)")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def fetch_debian_catalogs(packages: Iterable[str] = DEBIAN_PACKAGES, cache_dir: str | os.PathLike | None = None,
                          *, download: bool = True, langs: Iterable[str] = ("de", "fr", "es"),
                          warn: Warn = _no_warn) -> list[DebCatalogs]:
    """Download (unless cached or ``download`` is False) and extract the packages' catalogs.
    Returns one entry per package that is in the cache, sorted by package name."""
    names = check_packages(packages)
    if shutil.which("dpkg-deb") is None:
        warn("dpkg-deb not found: no catalogs from Debian packages (install dpkg)")
        return []
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    deb_dir, ex_dir = cache / "debs", cache / "extract"
    deb_dir.mkdir(parents=True, exist_ok=True)
    ex_dir.mkdir(parents=True, exist_ok=True)
    cached = _cached_debs(deb_dir)
    missing = [p for p in names if p not in cached]
    if missing and download:
        _download(missing, deb_dir, warn)
        cached = _cached_debs(deb_dir)
    elif missing:
        warn(f"{len(missing)} Debian package(s) not in the cache {deb_dir} and --no-download given: "
             + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    out = []
    lang_t = tuple(langs)
    for name in names:
        deb = cached.get(name)
        if deb is None:
            continue
        package, version = _deb_fields(deb)
        dest = ex_dir / f"{package}_{version}".replace(":", "%3a")
        if not dest.is_dir():
            _extract(deb, dest, lang_t)
        sha = _sha256(deb)
        out.append(DebCatalogs(package=package, version=version, sha256=sha, root=dest))
    return out
