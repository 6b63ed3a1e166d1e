"""lora_grpo: safety LoRA for Stable Diffusion trained with online GRPO and a CLIP steering reward.

The method is SafeDiffusion-R1 (Kumar et al., "Online Reward Steering for Safe Diffusion Post-Training",
arXiv:2605.18719).
"""

__version__ = "0.1.0"
