"""`lowvram run` as a library: inputs -> conditioning (umT5, wav2vec2, VAE encode) -> the engine -> the mp4."""
