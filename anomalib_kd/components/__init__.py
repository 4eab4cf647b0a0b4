"""Shared parts: offline backbones, anomaly synthesis, anomaly maps / smoothing, selective scan, VMamba."""
