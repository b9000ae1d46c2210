"""Re-ID training losses: ``ReIDLoss`` combines CE, triplet, center, SupCon, ArcFace and i2t."""
from handclip.losses.center import CenterLoss
from handclip.losses.combined import ReIDLoss

__all__ = ["CenterLoss", "ReIDLoss"]
