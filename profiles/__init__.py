"""Hardware profiles, one TOML file each (installed as `lowvram.profiles`, read as package data)."""
