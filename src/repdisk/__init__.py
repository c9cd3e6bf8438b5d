"""repdisk: a replicating block device for QEMU guests, built on nbdkit and libnbd."""

__version__ = "0.1.0"
