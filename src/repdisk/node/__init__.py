"""A node: its key table and config, state file, control commands, and the Node behind the
nbdkit plugin with its roles."""
