"""lowvram: low-VRAM quantized inference for Live Avatar (Wan2.2-S2V-14B + the LiveAvatar LoRA)."""

__version__ = "0.1.0"
