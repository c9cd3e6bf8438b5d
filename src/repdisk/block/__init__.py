"""Block devices: the device protocol, raw images, overlays, file helpers, image locks,
range locks, dirty maps, the block cache.  Imports only the shared modules."""
