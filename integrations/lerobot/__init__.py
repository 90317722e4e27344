"""lerobot as an optional extra (docs/lerobot.md): our demos as a LeRobotDataset v3.0 (``dataset``), and lerobot's
XVLA, SmolVLA and GR00T action head as chunk predictors and cache targets of the engine (``adapters``).

Nothing here is imported by ``bac/``, ``policies/`` or ``backends/``; lerobot is imported inside the functions,
so importing this package works without it.
"""
