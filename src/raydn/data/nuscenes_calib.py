"""Real nuScenes sensor calibration of one car, used by the synthetic world generator.

Source: nuScenes ``v1.0-mini/calibrated_sensor.json`` and ``sensor.json`` of vehicle ``n015``
(Singapore logs, e.g. ``scene-0061``/``scene-0103``). The numbers are the dataset's own values as
reproduced verbatim in several independent public repositories found with the code index (camera
intrinsics, camera extrinsics, LIDAR_TOP extrinsic and the global sensor tokens agree across them).

Conventions (nuScenes): ``translation`` in metres of the sensor origin in the ego frame
(x forward, y left, z up, origin at the rear axle on the ground); ``rotation`` quaternion
``(w, x, y, z)`` rotating sensor coordinates into ego coordinates (sensor -> ego). Camera frames
are OpenCV-style (x right, y down, z forward); intrinsics are 3x3 for 1600 x 900 images.
"""
from __future__ import annotations

import numpy as np

from raydn.core.frames import pose_matrix

#: Image size (width, height) of every nuScenes camera, pixels.
IMAGE_SIZE = (1600, 900)

#: Camera channel -> {translation, rotation (wxyz), intrinsic (3x3)} (sensor -> ego).
CAMERA_CALIB = {
    "CAM_FRONT": dict(
        translation=(1.70079118954, 0.0159456324149, 1.51095763913),
        rotation=(0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49737083824542755),
        intrinsic=((1266.417203046554, 0.0, 816.2670197447984),
                   (0.0, 1266.417203046554, 491.50706579294757), (0.0, 0.0, 1.0))),
    "CAM_FRONT_RIGHT": dict(
        translation=(1.5508477543, -0.493404796419, 1.49574800619),
        rotation=(0.2060347966337182, -0.2026940577919598, 0.6824507824531167, -0.6713610884174485),
        intrinsic=((1260.8474446004698, 0.0, 807.968244525554),
                   (0.0, 1260.8474446004698, 495.3344268742088), (0.0, 0.0, 1.0))),
    "CAM_FRONT_LEFT": dict(
        translation=(1.52387798135, 0.494631336551, 1.50932822144),
        rotation=(0.6757265034669446, -0.6736266522251881, 0.21214015046209478, -0.21122827103904068),
        intrinsic=((1272.5979470598488, 0.0, 826.6154927353808),
                   (0.0, 1272.5979470598488, 479.75165386361925), (0.0, 0.0, 1.0))),
    "CAM_BACK": dict(
        translation=(0.0283260309358, 0.00345136761476, 1.57910346144),
        rotation=(0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578),
        intrinsic=((809.2209905677063, 0.0, 829.2196003259838),
                   (0.0, 809.2209905677063, 481.77842384512485), (0.0, 0.0, 1.0))),
    "CAM_BACK_LEFT": dict(
        translation=(1.03569100218, 0.484795032713, 1.59097014818),
        rotation=(0.6924185592174665, -0.7031619420114925, -0.11648342771943819, 0.11203317912370753),
        intrinsic=((1256.7414812095406, 0.0, 792.1125740759628),
                   (0.0, 1256.7414812095406, 492.7757465151356), (0.0, 0.0, 1.0))),
    "CAM_BACK_RIGHT": dict(
        translation=(1.0148780988, -0.480568219723, 1.56239545128),
        rotation=(0.12280980120078765, -0.132400842670559, -0.7004305821388234, 0.690496031265798),
        intrinsic=((1259.5137405846733, 0.0, 807.2529053838625),
                   (0.0, 1259.5137405846733, 501.19579884916527), (0.0, 0.0, 1.0))),
}

#: LIDAR_TOP -> ego calibration of the same car.
LIDAR_CALIB = dict(
    translation=(0.943713, 0.0, 1.84023),
    rotation=(0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817),
)

#: The global nuScenes sensor tokens (sensor.json is identical for every car).
SENSOR_TOKENS = {
    "LIDAR_TOP": "dc8b396651c05aedbb9cdaae573bb567",
    "CAM_FRONT": "725903f5b62f56118f4094b46a4470d8",
    "CAM_FRONT_RIGHT": "2f7ad058f1ac5557bf321c7543758f43",
    "CAM_FRONT_LEFT": "ec4b5d41840a509984f7ec36419d4c09",
    "CAM_BACK": "ce89d4f3050b5892b33b3d328c5e82a3",
    "CAM_BACK_LEFT": "a89643a5de885c6486df2232dc954da2",
    "CAM_BACK_RIGHT": "ca7dba2ec9f95951bbe67246f7f2c3f7",
}

#: HDL-32E beam elevations (degrees, lowest first) of the nuScenes LIDAR_TOP.
LIDAR_ELEVATIONS_DEG = tuple(float(v) for v in np.linspace(-30.67, 10.67, 32))


def camera_to_ego(channel: str) -> np.ndarray:
    """4x4 camera -> ego transform of ``channel`` (float64)."""
    c = CAMERA_CALIB[channel]
    return pose_matrix(c["rotation"], c["translation"])


def lidar_to_ego() -> np.ndarray:
    """4x4 LIDAR_TOP -> ego transform (float64)."""
    return pose_matrix(LIDAR_CALIB["rotation"], LIDAR_CALIB["translation"])


def camera_intrinsic(channel: str) -> np.ndarray:
    """3x3 float64 intrinsic matrix of ``channel`` for 1600 x 900 images."""
    return np.array(CAMERA_CALIB[channel]["intrinsic"], dtype=np.float64)
