"""The QEMU microvm backend: vm (one guest and its command line), accel (KVM or TCG, decided by a
canary boot), snapshot (template guests and their snapshots), qmp (the control socket), backend."""

from harness.sandbox.qemu.backend import FEATURES, QemuBackend, check_argument, create_backend, sweep_leftovers

__all__ = ["FEATURES", "QemuBackend", "check_argument", "create_backend", "sweep_leftovers"]
