"""The repdisk command: node processes, status views, lab, resources, OCF agent, up/down."""
