"""Shared parts: backbones and pretrained weights, anomaly synthesis and maps, selective scan, VMamba."""
