"""Block devices: the device protocol, raw images, overlays, range locks, dirty maps, the block cache."""
