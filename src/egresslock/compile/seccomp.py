"""``--target seccomp``: the sandbox's syscall filter as an OCI / Docker seccomp profile.

The profile is built from the same data :mod:`egresslock.sandbox.seccomp` installs (the allowed
socket families and types, the namespace flags of clone, the refused syscalls with their
reasons), so a container runs under the filter ``egresslock run`` uses; a test loads both into
libseccomp and compares the generated BPF. Read that module for why each door is closed and why
each errno was chosen.

How runtimes read a profile (runc, crun; Docker and containerd pass it on): each entry becomes
one libseccomp rule per name; conditions on different arguments of one entry are ANDed. With
``SCMP_CMP_MASKED_EQ``, ``value`` is the mask and ``valueTwo`` the datum. ``architectures`` is
left out, so only the native architecture is in the filter and any other (i386 through
``int 0x80``, x32) meets the runtime's bad-architecture action (kill), as in the sandbox.

The profile does not depend on the policy's rules: it closes the doors *around* the network
(raw and packet sockets, AF_VSOCK, io_uring, new namespaces), whatever the policy allows. The
policy's name and hash are recorded in it all the same, so a deployment can be traced.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from egresslock.compile.common import (
    Artifact,
    CompileOptions,
    CompileResult,
    PolicySource,
    all_via_proxy,
    header_lines,
)
from egresslock.policy.model import Policy
from egresslock.sandbox.seccomp import (
    AF_INET,
    AF_INET6,
    ALLOWED_FAMILIES,
    ALLOWED_INET_TYPES,
    CLONE_NAMESPACE_FLAGS,
    REFUSED_SYSCALLS,
    SOCK_TYPE_MASK,
)

FILE_NAME = "egresslock-seccomp.json"
# Families below this bound are refused one by one, the rest with one comparison; the sandbox
# uses the same bound (a test keeps them equal). AF_MAX is 46 on Linux 6.x.
FAMILY_BOUND = 64
SOCKET_CALLS = ("socket", "socketpair")


def seccomp_profile() -> dict[str, Any]:
    """The filter as an OCI ``linux.seccomp`` object (also a Docker ``--security-opt`` file)."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [*_socket_entries(), *_clone_entries(), *_refused_entries()],
    }


def _errno(names: list[str], number: int, args: list[dict[str, Any]] | None = None,
           comment: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": number}
    if args:
        entry["args"] = args
    if comment:
        entry["comment"] = comment
    return entry


def _socket_entries() -> list[dict[str, Any]]:
    names = list(SOCKET_CALLS)
    out: list[dict[str, Any]] = [
        _errno(names, errno.EAFNOSUPPORT, [{"index": 0, "value": family, "op": "SCMP_CMP_EQ"}])
        for family in range(FAMILY_BOUND) if family not in ALLOWED_FAMILIES
    ]
    out.append(_errno(names, errno.EAFNOSUPPORT,
                      [{"index": 0, "value": FAMILY_BOUND, "op": "SCMP_CMP_GE"}],
                      "families outside UNIX, INET, INET6, as from a kernel without them"))
    for family in (AF_INET, AF_INET6):
        for sock_type in range(SOCK_TYPE_MASK + 1):
            if sock_type in ALLOWED_INET_TYPES:
                continue
            out.append(_errno(names, errno.EPERM, [
                {"index": 0, "value": family, "op": "SCMP_CMP_EQ"},
                {"index": 1, "value": SOCK_TYPE_MASK, "valueTwo": sock_type,
                 "op": "SCMP_CMP_MASKED_EQ"},
            ]))
    return out


def _clone_entries() -> list[dict[str, Any]]:
    # clone's flags are argument 0 on every architecture but s390, where this profile does not
    # apply (the sandbox picks the argument at run time; a profile cannot).
    out = [
        _errno(["clone"], errno.EPERM,
               [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
               f"clone with {name}: a new namespace escapes or reshapes the sandbox")
        for name, flag in CLONE_NAMESPACE_FLAGS.items()
    ]
    out.append(_errno(["clone3"], errno.ENOSYS, comment="its flags are behind a pointer "
                      "seccomp cannot read; glibc falls back to clone"))
    return out


def _refused_entries() -> list[dict[str, Any]]:
    return [_errno([name], errno.EPERM, comment=why) for name, why in REFUSED_SYSCALLS]


def compile_seccomp(policy: Policy, source: PolicySource,
                    options: CompileOptions) -> CompileResult:
    """The profile as JSON, its header in a ``comment`` list (JSON has no comments; runtimes
    ignore keys they do not know)."""
    del options  # the profile has no options
    via_proxy = all_via_proxy(policy, "a syscall filter does not decide destinations; the "
                              "network layer sends them to the proxy")
    header = header_lines(source, "seccomp", via_proxy, [
        "Use: docker run --security-opt seccomp=egresslock-seccomp.json ...; Kubernetes: "
        "copy it under the kubelet's seccomp directory and set seccompProfile: {type: "
        "Localhost, localhostProfile: egresslock-seccomp.json}.",
        "Refuses raw, packet and netlink sockets, AF_VSOCK, io_uring, new namespaces, mount, "
        "ptrace, bpf and keyrings; everything else is allowed. Not for s390.",
    ])
    profile = {"comment": header, **seccomp_profile()}
    return CompileResult("seccomp", (Artifact(FILE_NAME, profile_json(profile), "json"),),
                         via_proxy)


def profile_json(profile: dict[str, Any]) -> str:
    """JSON with one syscall entry per line: 130 entries stay a page a reviewer can scan."""
    lines = ["{"]
    for index, (key, value) in enumerate(profile.items()):
        comma = "," if index < len(profile) - 1 else ""
        if key == "syscalls":
            lines.append(f"  {json.dumps(key)}: [")
            lines += [f"    {json.dumps(e)}" + ("," if i < len(value) - 1 else "")
                      for i, e in enumerate(value)]
            lines.append(f"  ]{comma}")
        else:
            text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {text}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"
