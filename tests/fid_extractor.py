"""A tiny torch-fidelity feature extractor for the diffusion tests.

The real Inception weights cannot be downloaded here (no network), so the tests compute FID
in this extractor's feature space instead. Importing the module registers it, which is how
any extractor is plugged in: ``fid.extractor_module=tests.fid_extractor
fid.feature_extractor=test-pixel-blocks`` makes the task import it on the driver and on
every Ray worker before computing FID.
"""

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

NAME = "test-pixel-blocks"


class PixelBlocks(FeatureExtractorBase):
    """16 features: the mean brightness of each block of a 4x4 grid over the image."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = x.float().mean(dim=1, keepdim=True) / 255  # (B, 1, H, W) from uint8 (B, 3, H, W)
        return (F.adaptive_avg_pool2d(x, 4).flatten(1),)  # (B, 16)

    @staticmethod
    def get_provided_features_list():
        return ("blocks",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "blocks"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros((1, 3, 16, 16), dtype=torch.uint8)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(NAME, PixelBlocks)
