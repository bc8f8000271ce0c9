"""Root of the exception tree.

Each package derives its own typed errors from :class:`ApplianceError`::

    ApplianceError
     ├── kvm.KvmError ── GuestMemoryError, VcpuError, BootError
     ├── pci.PciError
     ├── virtio.VirtioError ── QueueError, VhostUserError
     ├── storage.StorageError ── BlkError, BackendOpenError
     ├── qcow2.Qcow2Error
     ├── net.NetError
     ├── nat.NatError
     ├── machine.ConfigError (command-line and config validation; exit code 2)
     └── qmp.QmpError

    HelpRequested (not an error: an option's ``help`` value, printed, exit status 0)

Messages are one short sentence; causes are chained with ``raise … from``.
"""


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """Bad user input: a command-line option, a config value, a missing file.

    The CLI prints the message on one line and exits with status 2.
    """


class HelpRequested(Exception):
    """An option given ``help`` (``-netdev help``, ``-nic model=help``): QEMU prints the
    choices on standard output and exits with status 0. The CLI does the same with
    the text this carries."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
