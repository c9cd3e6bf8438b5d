"""A node: its key table and config, state file, control commands, the Node behind the nbdkit plugin."""
