"""appliance: a KVM virtual machine monitor in Python built around the I/O data path."""

__version__ = "0.1.0"
