"""Run a command the way systemd's socket activation does (sd_listen_fds(3)), for the tests.

    python3 listen_fds_exec.py FD=NAME [FD=NAME ...] -- COMMAND [ARG ...]

The descriptors (inherited from the caller, e.g. through Popen's pass_fds) are moved to 3, 4, ...
in the order given, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (this process's PID, which the exec
keeps) are set, and COMMAND replaces this process. A test that holds the listening socket itself
can then stop the command and start another on the same socket, as systemd does across a restart.
Independent of gateway.py on purpose: it checks the protocol, not our reading of it.
"""
import os
import sys


def main(argv):
    split = argv.index("--")
    specs, command = argv[:split], argv[split + 1:]
    fds = [int(spec.split("=", 1)[0]) for spec in specs]
    names = [spec.split("=", 1)[1] if "=" in spec else "unknown" for spec in specs]
    # Above every source and target first, so that no move clobbers a descriptor not yet moved.
    high = max(fds + [3 + len(fds)]) + 1
    for index, fd in enumerate(fds):
        os.dup2(fd, high + index, inheritable=False)
    for index in range(len(fds)):
        os.dup2(high + index, 3 + index, inheritable=True)
    for fd in set(fds) - set(range(3, 3 + len(fds))):
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names),
                      LISTEN_PID=str(os.getpid()))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
