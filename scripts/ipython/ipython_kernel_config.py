"""The project's kernel configuration, installed into .venv/etc/ipython/ by `make setup`.

ipykernel 7 warns, once per kernel start, that the kernel "is running over TCP without
encryption". Every chapter executed by `make book`, `make notebooks` and nbval starts a kernel,
so a build prints it once per chapter. The kernels Jupyter starts here listen on 127.0.0.1
only, where no other machine can reach them, and every message is signed with a key only the
kernel and its client know: on loopback the warning says nothing that needs doing. This drops
that one message when the kernel listens on a loopback address, and keeps it (and every other
message) otherwise.
"""

import logging

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _drop_loopback_tcp_notice(record: logging.LogRecord) -> bool:
    if "Kernel is running over TCP without encryption" not in record.getMessage():
        return True
    from ipykernel.kernelapp import IPKernelApp

    ip = IPKernelApp.instance().ip if IPKernelApp.initialized() else None
    return ip not in LOOPBACK


# The kernel application logs under its class name; this file runs before it opens its sockets.
logging.getLogger("IPKernelApp").addFilter(_drop_loopback_tcp_notice)
