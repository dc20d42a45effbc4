"""Offline conversion to 8-bit safetensors and the quantized runtime layers (installed as `lowvram.quantize`)."""
