"""The controller: checkpoints, failover, re-protection; the guest's monitor and VM state;
metrics."""
