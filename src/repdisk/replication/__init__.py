"""Replication: the framework and stages, the secondary, writer sessions, the forwarder
and its tickets and batch records, resync, the primary.  Imports block and the shared
modules."""
