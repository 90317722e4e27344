"""Image generators on the cache engine: class-conditional DiT (``dit_image``). Imports ``bac`` only, never ``policies``."""
