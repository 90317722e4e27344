"""Robot policies: pure action-chunk predictors that the runtime drives."""
from policies.checkpoint import POLICY_REGISTRY, load_policy, save_policy
from policies.diffusion_policy import DiffusionTransformerPolicy, DPTConfig
from policies.normalizer import Normalizer

__all__ = ["DPTConfig", "DiffusionTransformerPolicy", "Normalizer", "POLICY_REGISTRY", "load_policy", "save_policy"]
