"""Deprecated alias of `adapt.annealing` (attention-mask annealing), kept for one release."""

import warnings

from .training.annealing import (ANNEALING_IMPLEMENTATIONS, AnnealConfig, annealed_attention_mask,  # noqa: F401
                        check_annealing_supported, mask_ratio, position_ids_from_padding)

warnings.warn("adapt.masks is deprecated: import adapt.annealing instead", DeprecationWarning, stacklevel=2)
