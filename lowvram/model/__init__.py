"""The LiveAvatar S2V DiT, the Wan2.1 VAE, and the text and audio encoders."""
