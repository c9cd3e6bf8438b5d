"""repdisk's benchmark harness: fio over NBD against repdisk and its peers (see bench/README.md)."""
