"""Run a command with one system call denied by a seccomp filter, as systemd's
``SystemCallFilter=`` does it.

    python tests/seccomp_deny.py setpriority eperm -- CMD ARG...   # SystemCallErrorNumber=EPERM
    python tests/seccomp_deny.py setpriority kill -- CMD ARG...    # no SystemCallErrorNumber

Why a real filter and not a patched ``os.nice``: the unit's ``SystemCallFilter=~@resources``
denies ``setpriority`` in the kernel, for the daemon and every process it starts; a test of
what the scoring child does then must meet the same refusal from the same place. The filter
is installed on this process (no privilege needed, with ``PR_SET_NO_NEW_PRIVS``) and is
inherited across fork and exec, as the unit's is. x86_64 and aarch64 only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

# (audit arch, syscall numbers) per machine; the numbers are the kernel's, per architecture
_ARCH = {
    "x86_64": (0xC000003E, {"setpriority": 141, "getpriority": 140}),
    "aarch64": (0xC00000B7, {"setpriority": 140, "getpriority": 141}),
}
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_RET_ALLOW, _RET_ERRNO, _RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def supported() -> bool:
    """Whether this machine's architecture is one the filter knows."""
    return platform.machine() in _ARCH


def deny(syscall: str, action: str) -> None:
    """Install a filter on this process: ``syscall`` fails with EPERM (``eperm``) or kills the
    process with SIGSYS (``kill``); every other call is allowed."""
    arch, numbers = _ARCH[platform.machine()]
    ret = _RET_ERRNO | errno.EPERM if action == "eperm" else _RET_KILL_PROCESS
    program = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 0, 3, arch),  # another ABI: allow
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JEQ_K, 0, 1, numbers[syscall]),
        (_RET_K, 0, 0, ret),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(program), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> int:
    syscall, action, sep, *command = argv
    if sep != "--" or action not in ("eperm", "kill") or not command:
        print(__doc__, file=sys.stderr)
        return 2
    deny(syscall, action)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
