"""Tiny random-init lerobot models, built offline from configs in code (no weights, no Hub).

  tiny_xvla(...)          XVLAPolicy with a Florence-2 config given as a dict (DaViT + BART encoder, a few widths)
  tiny_smolvla(dir, ...)  SmolVLAPolicy; its constructor calls ``AutoConfig/AutoProcessor.from_pretrained`` even
                          with ``load_vlm_weights=False``, so ``write_tiny_smolvlm`` first writes a local folder with
                          a ``SmolVLMConfig`` and a processor whose tokenizer is built in code (a word-level vocab
                          with SmolVLM's special tokens)
  tiny_groot_head(...)    GR00T N1.5's flow-matching action head alone (``FlowmatchingActionHead``: a cross-attention
                          DiT over state/action tokens and backbone tokens); the Eagle VLM backbone is not built

Shapes: Do state dim, Da action dim, T chunk length (horizon), K flow-matching steps, S image side.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

SMOLVLM_SPECIALS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                    "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
                    "video_token": "<video>"}
VOCAB = 64  # token ids of every tiny language model; the instructions are fixed token ids (see adapters)


def _features(state_dim: int, action_dim: int, image_size: int) -> tuple[dict, dict]:
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {"observation.images.cam": PolicyFeature(FeatureType.VISUAL, (3, image_size, image_size)),
              "observation.state": PolicyFeature(FeatureType.STATE, (state_dim,))}
    return inputs, {"action": PolicyFeature(FeatureType.ACTION, (action_dim,))}


def tiny_xvla(state_dim: int = 4, action_dim: int = 2, horizon: int = 8, num_steps: int = 10, image_size: int = 32,
              width: int = 32, depth: int = 2, seed: int = 0):
    from lerobot.policies.xvla.configuration_xvla import XVLAConfig
    from lerobot.policies.xvla.modeling_xvla import XVLAPolicy

    florence = {
        "vision_config": {"dim_embed": [16, 32, 32, 32], "num_heads": [2, 2, 2, 2], "num_groups": [2, 2, 2, 2],
                          "depths": [1, 1, 1, 1], "window_size": 2, "projection_dim": 32,
                          "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 16},
                          "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 4}},
        "text_config": {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
                        "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "encoder_attention_heads": 2,
                        "decoder_attention_heads": 2, "max_position_embeddings": 64},
        "vocab_size": VOCAB, "projection_dim": 32,
    }
    inputs, outputs = _features(state_dim, action_dim, image_size)
    cfg = XVLAConfig(input_features=inputs, output_features=outputs, florence_config=florence, hidden_size=width,
                     depth=depth, num_heads=2, len_soft_prompts=4, num_domains=2, max_len_seq=128, chunk_size=horizon,
                     n_action_steps=horizon, action_mode="auto", max_action_dim=action_dim, max_state_dim=state_dim,
                     num_denoising_steps=num_steps, device="cpu")
    torch.manual_seed(seed)
    return XVLAPolicy(cfg).eval()


def write_tiny_smolvlm(directory: str | os.PathLike) -> Path:
    """A local SmolVLM "checkpoint" folder without weights: config.json and a processor (tokenizer built here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    d = Path(directory)
    if (d / "config.json").exists() and (d / "tokenizer.json").exists():
        return d
    tokens = ["<pad>", "<unk>", "<s>", "</s>", *SMOLVLM_SPECIALS.values()]
    vocab = {t: i for i, t in enumerate(tokens + [f"w{i}" for i in range(VOCAB - len(tokens))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", extra_special_tokens=SMOLVLM_SPECIALS)
    cfg = SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        text_config={"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "max_position_embeddings": 256},
        scale_factor=2, image_token_id=vocab["<image>"])
    cfg.save_pretrained(d)
    SmolVLMProcessor(image_processor=SmolVLMImageProcessor(), tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=4).save_pretrained(d)
    return d


def tiny_smolvla(vlm_dir: str | os.PathLike, state_dim: int = 4, action_dim: int = 2, horizon: int = 8,
                 num_steps: int = 10, image_size: int = 32, seed: int = 0):
    """SmolVLA over the tiny SmolVLM of ``write_tiny_smolvlm(vlm_dir)`` (written there if missing): 2 VLM layers,
    2 expert layers (layer 0 self-attention over prefix and actions, layer 1 cross-attention to the prefix)."""
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    write_tiny_smolvlm(vlm_dir)
    inputs, outputs = _features(state_dim, action_dim, image_size)
    cfg = SmolVLAConfig(input_features=inputs, output_features=outputs, vlm_model_name=str(vlm_dir),
                        load_vlm_weights=False, num_vlm_layers=2, chunk_size=horizon, n_action_steps=horizon,
                        max_state_dim=state_dim, max_action_dim=action_dim,
                        resize_imgs_with_padding=(image_size, image_size), num_steps=num_steps, device="cpu")
    torch.manual_seed(seed)
    return SmolVLAPolicy(cfg).eval()


def tiny_groot_head(state_dim: int = 4, action_dim: int = 2, horizon: int = 8, num_steps: int = 10,
                    backbone_dim: int = 24, num_layers: int = 4, seed: int = 0):
    """GR00T N1.5's action head at toy widths; like N1.5, DiT blocks alternate cross-attention to the backbone
    tokens (even blocks) and self-attention (odd blocks)."""
    from lerobot.policies.groot.action_head.flow_matching_action_head import (FlowmatchingActionHead,
                                                                             FlowmatchingActionHeadConfig)

    cfg = FlowmatchingActionHeadConfig(
        diffusion_model_cfg={"num_attention_heads": 2, "attention_head_dim": 16, "output_dim": 32,
                             "num_layers": num_layers, "dropout": 0.2, "final_dropout": True,
                             "interleave_self_attention": True, "norm_type": "ada_norm", "positional_embeddings": None,
                             "cross_attention_dim": backbone_dim},
        vl_self_attention_cfg={"num_attention_heads": 2, "attention_head_dim": backbone_dim // 2, "num_layers": 1,
                               "dropout": 0.2, "final_dropout": True, "positional_embeddings": None},
        hidden_size=32, input_embedding_dim=32, backbone_embedding_dim=backbone_dim, max_state_dim=state_dim,
        action_dim=action_dim, action_horizon=horizon, num_inference_timesteps=num_steps, max_num_embodiments=2,
        num_target_vision_tokens=4, max_seq_len=64, add_pos_embed=True, use_vlln=True)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts and trainable flags
        return FlowmatchingActionHead(cfg).eval()
