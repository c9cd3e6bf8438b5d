"""The repdisk command: node processes, the ctl client, lab, resources, OCF agent, up/down."""
