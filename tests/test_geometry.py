import math

import torch

from raydn.geometry import (box_corners, denormalize_bbox, denormalize_points, inverse_sigmoid,
                            nerf_positional_encoding, normalize_bbox, normalize_points, pos2posemb1d,
                            pos2posemb3d, project_points)


def test_box_encoding_roundtrip():
    g = torch.Generator().manual_seed(0)
    b = torch.cat([torch.randn(50, 3, generator=g) * 20, torch.rand(50, 3, generator=g) * 4 + 0.3,
                   (torch.rand(50, 1, generator=g) * 2 - 1) * math.pi, torch.randn(50, 2, generator=g)], 1)
    enc = normalize_bbox(b)
    assert enc.shape == (50, 10)
    assert torch.allclose(enc[:, 3:6], b[:, 3:6].log())
    assert torch.allclose(enc[:, 6], b[:, 6].sin()) and torch.allclose(enc[:, 7], b[:, 6].cos())
    assert torch.allclose(denormalize_bbox(enc), b, atol=1e-5)


def test_normalize_points_and_inverse_sigmoid():
    p = torch.tensor([[-51.2, -51.2, -5.0], [51.2, 51.2, 3.0], [0.0, 0.0, -1.0]])
    n = normalize_points(p)
    assert torch.allclose(n, torch.tensor([[0.0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5]]))
    assert torch.allclose(denormalize_points(n), p)
    x = torch.tensor([-0.5, 0.0, 0.25, 1.0, 2.0])
    y = inverse_sigmoid(x)
    # clamp to [0,1], then log(max(x,1e-5)/max(1-x,1e-5))
    assert torch.allclose(y, torch.tensor([math.log(1e-5), math.log(1e-5), math.log(1 / 3),
                                           math.log(1e5), math.log(1e5)]), atol=1e-5)


def test_positional_encodings_layout():
    p = torch.tensor([[0.25, 0.5, 0.75]])
    e = pos2posemb3d(p)
    assert e.shape == (1, 384)
    # first block encodes y (official order y, x, z); feature 0 = sin(2*pi*y / 1), feature 1 = cos(...)
    assert torch.allclose(e[0, 0], torch.tensor(math.sin(2 * math.pi * 0.5)), atol=1e-6)
    assert torch.allclose(e[0, 1], torch.tensor(math.cos(2 * math.pi * 0.5)), atol=1e-6)
    assert torch.allclose(e[0, 128], torch.tensor(math.sin(2 * math.pi * 0.25)), atol=1e-6)
    f = 10000 ** (2 * 1 / 128)
    assert torch.allclose(e[0, 258], torch.tensor(math.sin(2 * math.pi * 0.75 / f)), atol=1e-6)
    t = pos2posemb1d(torch.tensor([[0.3]]))
    assert t.shape == (1, 256) and torch.allclose(t[0, 1], torch.tensor(math.cos(2 * math.pi * 0.3)))
    v = torch.randn(4, 15)
    n = nerf_positional_encoding(v)
    assert n.shape == (4, 180)
    assert torch.allclose(n[:, :15], v.sin()) and torch.allclose(n[:, 15:30], v.cos())
    assert torch.allclose(n[:, 30:45], (2 * v).sin())


def test_box_corners_and_projection():
    box = torch.tensor([[10.0, 2.0, 1.0, 4.0, 2.0, 1.5, math.pi / 2, 0, 0]])
    c = box_corners(box)[0]
    # yaw 90 deg: box length along +y; front-left-bottom corner (+l/2,+w/2,-h/2) -> (10-1, 2+2, 0.25)
    assert torch.allclose(c[0], torch.tensor([9.0, 4.0, 0.25]), atol=1e-5)
    assert torch.allclose(c.mean(0), box[0, :3], atol=1e-5)
    assert torch.allclose(c[4, 2] - c[0, 2], torch.tensor(1.5))
    K = torch.eye(4)
    K[0, 0] = K[1, 1] = 100.0
    K[0, 2], K[1, 2] = 50.0, 40.0
    uv, d = project_points(torch.tensor([[1.0, 2.0, 10.0]]), K)
    assert torch.allclose(uv, torch.tensor([[60.0, 60.0]])) and torch.allclose(d, torch.tensor([10.0]))
