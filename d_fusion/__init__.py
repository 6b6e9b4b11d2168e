"""D-Fusion: DPO on visually consistent samples made by mask-guided self-attention fusion."""
