"""Model definitions: frozen vision towers, the Q-Former, and BLIP-2 with its stage-1 losses."""
