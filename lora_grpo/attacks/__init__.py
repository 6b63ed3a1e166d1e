"""Attacks on a safety adapter ("Attacks" issue): adversarial prompts and token embeddings that bring an erased
concept back, and their attack success rate on the base model and on base + adapter. `lora-grpo attack`."""
