"""Generators on the cache engine, by name (``eval/generate.py backend=NAME``): the class-conditional image DiT
(``dit_image``) and video DiT (``dit_video``). Imports ``bac`` only, never ``policies``; diffusers on use."""
from __future__ import annotations

BACKENDS = ("dit_image", "dit_video")


def backend(name: str):
    """(generator class, load function) of a backend; an unknown name lists the known ones."""
    if name == "dit_image":
        from backends.dit_image import DiTImageGenerator, load_dit_image

        return DiTImageGenerator, load_dit_image
    if name == "dit_video":
        from backends.dit_video import DiTVideoGenerator, load_dit_video

        return DiTVideoGenerator, load_dit_video
    raise ValueError(f"unknown backend {name!r}; known backends: {list(BACKENDS)}")
