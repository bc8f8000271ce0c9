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

Messages are one short sentence; causes are chained with ``raise … from``.
"""


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """Bad user input: a command-line option, a config value, a missing file.

    The CLI prints the message on one line and exits with status 2.
    """
