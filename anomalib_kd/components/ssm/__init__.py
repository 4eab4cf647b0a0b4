"""State-space components shared by DHKD (HSTM) and PDD (VMamba-Tiny teacher).

- :func:`selective_scan`: Mamba's selective scan, chunked pure PyTorch (CPU, export) or mamba-ssm (CUDA).
- :mod:`.fused`: the same scan as a fused C++ operator for OpenVINO's CPU runtime and eager CPU inference
  (built on first use; opt-in export with ``fused.export_openvino(..., fused=True)``).
- :class:`SS2D`, :func:`cross_scan`, :func:`cross_merge`: VMamba's 2-D selective-scan module (v0).
- :class:`VMambaTiny`, :func:`load_vmamba_checkpoint`: VMamba-Tiny v0 backbone and its checkpoint loader.
"""

from .selective_scan import auto_chunk_size, mamba_ssm_available, selective_scan, selective_scan_torch
from .ss2d import SS2D, cross_merge, cross_scan
from .vmamba import (
    VMAMBA_TINY_CHECKPOINT,
    VMambaTiny,
    VSSBlock,
    convert_vmamba_v0_state_dict,
    load_vmamba_checkpoint,
)

__all__ = [
    "SS2D",
    "VMAMBA_TINY_CHECKPOINT",
    "VMambaTiny",
    "VSSBlock",
    "auto_chunk_size",
    "convert_vmamba_v0_state_dict",
    "cross_merge",
    "cross_scan",
    "load_vmamba_checkpoint",
    "mamba_ssm_available",
    "selective_scan",
    "selective_scan_torch",
]
