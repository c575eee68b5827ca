"""Where archives and inputs live: the archive format, its lease, the input sources."""
