"""Model definitions that read paged KV: shared blocks in layers/, one file per family,
architecture names in architectures.py, their classes in registry.py."""
