"""What the test modules share; no test module imports another test module.

- ``nodes``: real nodes (nbdkit + the plugin) started the way ``repdisk`` starts them, and a
  replicating pair of them driven through control commands.
- ``commands``: the ``repdisk`` command, QEMU's tools and a pseudo-terminal, run as a user
  runs them; processes stopped and found.
- ``cli``: a pair started with ``repdisk primary|secondary --background``.
- ``replicas``: replicas built in-process (``SecondaryReplica`` over a fresh disk,
  ``PrimaryReplica`` against an nbdkit secondary serving ``batchserver.py``).
- ``controller``: a pair under a controller, a link the test cuts or hangs, a writer with an
  exact model of what it wrote.
- ``netns``, ``cluster``: network namespaces, and Corosync + Pacemaker clusters in them.
- ``pacemaker``: a cluster running the README's Pacemaker configuration.

Fixtures built on these are in ``tests/conftest.py``.
"""
