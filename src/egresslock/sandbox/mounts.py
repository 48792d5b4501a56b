"""The sandbox's mount namespace: host Unix sockets out of reach, the working directory kept.

A new network namespace cuts every IP route and every abstract Unix socket (those are per network
namespace), but not Unix sockets bound to paths: a socket file under ``/run`` (the Docker daemon,
D-Bus, systemd), ``/tmp`` (X11, an SSH agent) or anywhere else is a door to a host service that
may relay traffic outside. Landlock cannot refuse ``connect(2)`` on a path socket, so the sandbox
lays an empty tmpfs over the directories that hold them, and bind-mounts ``/dev/null`` over the
socket ``SSH_AUTH_SOCK`` names wherever it lives.

Paths the command needs below a hidden directory (its working directory in ``/tmp``, a
``--share``) are carried through: an ``O_PATH`` descriptor opened before the tmpfs goes on still
names the original directory, and ``mount --bind /proc/self/fd/N`` puts it back at its path.
Mounts made here belong to the sandbox's user namespace and are locked together (mount(7),
"locked mounts"): the command, which holds no capability after exec, cannot unmount them to see
what is below.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from egresslock.sandbox.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    mount,
)

# Directories where host services keep their sockets. /var/run is a link to /run on Debian:
# links are resolved and each directory is hidden once.
HIDDEN_DIRS = ("/run", "/var/run", "/tmp", "/var/tmp", "/dev/shm")  # noqa: S108
_STICKY = frozenset({"/tmp", "/var/tmp", "/dev/shm"})  # noqa: S108  world-writable, sticky


@dataclass(frozen=True, slots=True)
class MountPlan:
    """What the mount namespace hides and what it carries through."""

    hide: tuple[str, ...]
    share: tuple[str, ...]
    mask_files: tuple[str, ...]
    resolv_conf: str | None  # the content of the command's /etc/resolv.conf
    files: tuple[tuple[str, str], ...] = ()  # (path in a hidden tmpfs, content): the CA bundle
    # (host file, content it shows inside): a credential file shows its placeholder
    replace: tuple[tuple[str, str], ...] = ()
    # hidden after the carried paths are back: directories that may lie inside one of them
    hide_after: tuple[str, ...] = ()


def plan_mounts(cwd: str, share: Iterable[str], env: Mapping[str, str],
                hide: Sequence[str] = HIDDEN_DIRS, resolv_conf: str | None = None,
                files: Sequence[tuple[str, str]] = (), hide_extra: Sequence[str] = (),
                replace: Sequence[tuple[str, str]] = ()) -> MountPlan:
    """Decide the mounts from the host's view (before any namespace exists).

    ``hide_extra`` are more directories to cover (egresslock's keys and audit log);
    ``replace`` are files to show with other content (credential files, as placeholders).
    """
    hidden: list[str] = []
    for d in hide:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in hidden and real != "/":
            hidden.append(real)
    shared = [os.path.realpath(p) for p in (cwd, *share)]
    keep = tuple(dict.fromkeys(p for p in shared if any(_below(p, h) for h in hidden)))
    masks: list[str] = []
    agent = env.get("SSH_AUTH_SOCK")
    if agent:
        real = os.path.realpath(agent)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(real).st_mode) and not any(_below(real, h) for h in hidden):
                masks.append(real)
    for path, _ in files:
        if not any(_below(path, h) for h in hidden):
            raise ValueError(f"{path} must lie in a directory the sandbox hides (a tmpfs)")
    after = tuple(dict.fromkeys(os.path.realpath(d) for d in hide_extra
                                if os.path.isdir(d) and os.path.realpath(d) not in hidden))
    return MountPlan(tuple(hidden), keep, tuple(masks), resolv_conf, tuple(files),
                     tuple((os.path.realpath(p), c) for p, c in replace), after)


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def apply_mounts(plan: MountPlan, uid: int, gid: int) -> None:
    """Inside the new mount namespace, before exec: hide, carry through, mask.

    Raises OSError naming the path that failed; the caller refuses to run the command.
    """
    # Nothing done here may propagate back to the host's mounts.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    carried: list[tuple[str, int]] = []
    try:
        for path in plan.share:
            carried.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
        for directory in plan.hide:
            mode = "1777" if directory in _STICKY else "0755"
            mount("egresslock", directory, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"mode={mode},size=64m,uid={uid},gid={gid}")
        for path, fd in carried:
            _bind_fd(fd, path)
        for directory in plan.hide_after:
            if os.path.isdir(directory):  # else it lay in a hidden directory: gone already
                mount("egresslock", directory, "tmpfs", MS_NOSUID | MS_NODEV,
                      f"mode=0000,size=4k,uid={uid},gid={gid}")
        for path in plan.mask_files:
            mount("/dev/null", path, None, MS_BIND)
        for number, (path, content) in enumerate(plan.replace):
            _bind_content(path, content, plan.hide[0], number)
        for path, content in plan.files:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
        if plan.resolv_conf is not None and plan.hide:
            _bind_resolv_conf(plan.resolv_conf, plan.hide[0])
    finally:
        for _, fd in carried:
            os.close(fd)


def _bind_fd(fd: int, path: str) -> None:
    """Put the directory (or file) behind ``fd`` back at ``path`` inside a fresh tmpfs."""
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(path, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass
    mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)


def _bind_content(path: str, content: str, scratch: str, number: int) -> None:
    """Show ``content`` at ``path``: a file in the sandbox's own tmpfs, bound over it. A path
    that a hidden directory already covers is simply gone; nothing to replace there."""
    if not os.path.isfile(path):
        return
    source = os.path.join(scratch, f".egresslock-replaced-{number}")
    with open(source, "w") as f:
        f.write(content)
    os.chmod(source, 0o444)
    mount(source, path, None, MS_BIND)


def _bind_resolv_conf(content: str, scratch: str) -> None:
    """Point the command's resolver at the DNS stub.

    nftables sends every port-53 packet to the stub whatever the address, so this file is for
    clarity (``cat /etc/resolv.conf`` inside says where names come from) and for resolvers that
    read options from it. It is often a link into /run (systemd-resolved, resolvconf), which is
    now an empty tmpfs: create the link's target there so the bind has somewhere to land.
    """
    source = os.path.join(scratch, ".egresslock-resolv.conf")
    with open(source, "w") as f:
        f.write(content)
    target = os.path.realpath("/etc/resolv.conf")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w"):
            pass
    mount(source, target, None, MS_BIND)
