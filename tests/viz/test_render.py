import numpy as np
import torch

from raydn.viz.render import plot_training_curves, render_bev, render_cameras, render_frame, save_image_atomic


def _camera():
    K = torch.eye(4)
    K[0, 0] = K[1, 1] = 60.0
    K[0, 2], K[1, 2] = 64.0, 32.0
    # LiDAR x forward -> camera z; LiDAR y left -> camera -x; LiDAR z up -> camera -y
    E = torch.tensor([[0.0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    return K @ E


def test_render_cameras_draws_box_where_it_projects():
    imgs = np.zeros((6, 64, 128, 3), np.uint8)
    l2i = _camera()[None].repeat(6, 1, 1)
    box = torch.tensor([[10.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0, 0]])
    im = render_cameras(imgs, l2i, box, torch.tensor([0]), None)
    arr = np.asarray(im)
    assert arr.shape == (128, 384, 3)
    # CAM_FRONT is in the middle of the top row; its box spans u in 64 +- 60*1/9..1/11 px
    front = arr[:64, 128:256]
    ys, xs = np.nonzero(front.sum(-1) > 0)
    text_free = ys > 12
    assert text_free.any()
    assert abs(xs[text_free].mean() - 64) < 4 and abs(ys[text_free].mean() - 32) < 6


def test_bev_and_frame_and_curves(tmp_path):
    boxes = torch.tensor([[10.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.3, 0, 0]])
    bev = render_bev(boxes, torch.tensor([1]), boxes, size=200)
    assert bev.size == (200, 200) and np.asarray(bev).std() > 0
    imgs = np.zeros((6, 64, 128, 3), np.uint8)
    fr = render_frame(imgs, _camera()[None].repeat(6, 1, 1),
                      {"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}, boxes)
    p = save_image_atomic(fr, tmp_path / "f.png")
    assert p.exists() and fr.size[0] > 384
    hist = [{"iter": i, "loss": 10 / (i + 1)} for i in range(40)]
    c = plot_training_curves(hist, tmp_path / "c.png")
    assert c.stat().st_size > 1000
