"""Replication: the framework and stages, the secondary, sessions, batches, the forwarder, resync, the primary."""
