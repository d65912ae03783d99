"""AutoSOD: a MaskFormer-style salient-object network trained on pseudo-masks."""

from .autosod import AutoSOD, AutoSODOutput, build_autosod
from .losses import autosod_loss, dice_loss, ranking_loss

__all__ = ["AutoSOD", "AutoSODOutput", "autosod_loss", "build_autosod", "dice_loss", "ranking_loss"]
