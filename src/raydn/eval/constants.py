"""Constants of the nuScenes detection benchmark (``detection_cvpr_2019``) and of the official
result conversion (mmdet3d v1.0.0rc6 ``NuScenesDataset``), kept here so that the fast evaluator
and the submission writer work without nuscenes-devkit installed.

Values are copied from nuscenes-devkit 1.2.0 ``eval/detection/constants.py`` and
``configs/detection_cvpr_2019.json`` (checked by ``tests/eval/test_fast_eval.py`` against the
installed devkit when it is present).
"""
from __future__ import annotations

#: Detection classes in the devkit's order (``DETECTION_NAMES`` = the order of the config's
#: ``class_range``, which is the order every per-class table and mean uses).
DETECTION_NAMES = (
    "car", "truck", "bus", "trailer", "construction_vehicle",
    "pedestrian", "motorcycle", "bicycle", "traffic_cone", "barrier",
)

#: The nuScenes tracking classes (devkit ``TRACKING_NAMES``, ``tracking_nips_2019``).
TRACKING_NAMES = ("bicycle", "bus", "car", "motorcycle", "pedestrian", "trailer", "truck")

#: Attribute names in the devkit's order. Index ``-1`` in our arrays means "no attribute" ('').
ATTRIBUTE_NAMES = (
    "pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing",
    "cycle.with_rider", "cycle.without_rider",
    "vehicle.moving", "vehicle.parked", "vehicle.stopped",
)

#: ``detection_cvpr_2019`` class ranges (metres, BEV distance to the ego vehicle).
CLASS_RANGE = {
    "car": 50.0, "truck": 50.0, "bus": 50.0, "trailer": 50.0, "construction_vehicle": 50.0,
    "pedestrian": 40.0, "motorcycle": 40.0, "bicycle": 40.0,
    "traffic_cone": 30.0, "barrier": 30.0,
}

#: The five true-positive metrics in the devkit's order, and their printed names.
TP_METRICS = ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err")
TP_METRIC_PRINT = {"trans_err": "mATE", "scale_err": "mASE", "orient_err": "mAOE",
                   "vel_err": "mAVE", "attr_err": "mAAE"}

#: nuScenes category -> detection class (devkit ``category_to_detection_name`` and mmdet3d
#: ``NuScenesDataset.NameMapping``; identical tables).
CATEGORY_TO_DETECTION = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

#: Category whose boxes remove bicycle / motorcycle boxes lying inside them (devkit filter).
BIKE_RACK_CATEGORY = "static_object.bicycle_rack"

#: mmdet3d ``NuScenesDataset.DefaultAttribute`` (attribute of a box when no rule applies).
DEFAULT_ATTRIBUTE = {
    "car": "vehicle.parked",
    "pedestrian": "pedestrian.moving",
    "trailer": "vehicle.parked",
    "truck": "vehicle.parked",
    "bus": "vehicle.moving",
    "motorcycle": "cycle.without_rider",
    "construction_vehicle": "vehicle.parked",
    "bicycle": "cycle.without_rider",
    "barrier": "",
    "traffic_cone": "",
}

#: ``meta`` block of the official submission (camera-only, external pre-training data used).
SUBMISSION_META = {"use_camera": True, "use_lidar": False, "use_radar": False,
                   "use_map": False, "use_external": True}
