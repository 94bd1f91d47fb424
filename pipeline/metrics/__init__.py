"""Evaluation metrics: point clouds (pointcloud)."""

from pipeline.metrics.pointcloud import (
    chamfer_clouds,
    chamfer_distance,
    earth_movers_distance,
    pointcloud_metrics,
)

__all__ = ["chamfer_clouds", "chamfer_distance", "earth_movers_distance", "pointcloud_metrics"]
