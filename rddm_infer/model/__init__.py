"""The PyTorch side of rddm-infer: the reference network, checkpoints and the torch sampler.

Needs the ``torch`` extra (``pip install rddm-infer[torch]``). The lean runtime
(``import rddm_infer``) never imports this package on its own.
"""

from .unet import UNetConfig, UnetRes, attention_layout, fold_weight_standardization, to_export_form
from .checkpoint import LoadedModel, load_checkpoint, save_checkpoint, infer_unet_config, time_input_note
from .torch_sampler import TorchRDDM

__all__ = ["UNetConfig", "UnetRes", "attention_layout", "fold_weight_standardization", "to_export_form", "LoadedModel",
           "load_checkpoint", "save_checkpoint", "infer_unet_config", "time_input_note", "TorchRDDM"]
