"""Shared parts: offline backbones, anomaly synthesis, selective scan / SS2D / VMamba."""
