"""The ``rays`` world profile: columns of objects one behind another along rays from the cameras."""
import numpy as np

from raydn.data.synth.world import PROFILES, _propose, _spawn_plan, _simulate_ego, simulate_scene


def test_column_members_lie_on_one_ray_from_the_camera_cluster():
    rng = np.random.default_rng(0)
    prof = PROFILES["rays"]
    ego = _simulate_ego(rng, 19.5, prof)
    for cls_name in ("car", "pedestrian"):
        for _ in range(5):
            tau, members = _propose(rng, cls_name, "column", 3, ego, 19.5, prof)
            (exy,), (eyaw,) = ego.pose_at(tau)
            origin = exy + 1.3 * np.array([np.cos(eyaw), np.sin(eyaw)])
            d = np.stack([m[0] for m in members]) - origin
            bearings = np.arctan2(d[:, 1], d[:, 0])
            assert np.ptp(np.unwrap(bearings)) < 1e-9          # same ray
            r = np.linalg.norm(d, axis=1)
            gaps = np.diff(r)
            assert (gaps > (6.9 if cls_name == "car" else 2.9)).all()   # one behind another
            assert all(m[2] == 0.0 for m in members)                   # static


def test_rays_profile_adds_columns_and_demo_is_unchanged():
    plan_demo = _spawn_plan(np.random.default_rng(1), PROFILES["demo"].spawn, PROFILES["demo"].columns)
    plan_rays = _spawn_plan(np.random.default_rng(1), PROFILES["demo"].spawn, PROFILES["rays"].columns)
    assert plan_rays[:len(plan_demo)] == plan_demo
    assert plan_rays[len(plan_demo):] == [("car", "column", 3)] * 4 + [("pedestrian", "column", 3)] * 4
    demo, rays = simulate_scene("s", 0, 0, 40, "demo"), simulate_scene("s", 0, 0, 40, "rays")
    ped = 8
    assert (rays.objects.cls == ped).sum() >= (demo.objects.cls == ped).sum() + 6
