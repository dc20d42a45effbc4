"""Files in and out: checkpoint discovery and loading, the LoRA, input media, the streaming video writer, the prompt cache."""
