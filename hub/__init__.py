"""Publishing a safety adapter: export for diffusers and ComfyUI, a model card, and a push to the Hub.

Installed as `lora_grpo.hub`; it depends on `lora_grpo`, never the reverse.
"""
