"""Replayable views: bit-exact replay, exact flips, invertible box mapping, policy contract."""

import random

import pytest
import torch

from detkd.data.views import View, ViewPolicy, apply_view, boxes_to_original


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _boxes(h: int, w: int, n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 1
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("view", [View(size=64), View(size=64, flip=True), View(size=100, flip=True), View(size=37)])
def test_replay_is_bit_exact_after_round_trips(view):
    image, boxes = _image(45, 70), _boxes(45, 70)
    x1, b1 = apply_view(image, boxes, view)
    for replayed in (view, View.from_dict(view.to_dict()), View.from_key(view.key)):
        assert replayed == view
        x2, b2 = apply_view(image.clone(), boxes.clone(), replayed)
        assert torch.equal(x1, x2) and torch.equal(b1, b2)
    assert x1.dtype == torch.float32 and 0.0 <= x1.min() and x1.max() <= 1.0


def test_keys():
    assert View(size=192).key == "s192"
    assert View(size=192, flip=True).key == "s192-flip"
    assert View.from_key("s96-flip") == View(size=96, flip=True)
    assert View.from_dict({"size": 128, "flip": False}) == View(size=128)


def test_identity_view_is_the_image_scaled_to_unit_range():
    image, boxes = _image(40, 60), _boxes(40, 60)
    x, b = apply_view(image, boxes, View(size=60))
    assert torch.equal(x, image.float() / 255.0)
    assert torch.equal(b, boxes)


@pytest.mark.parametrize("size", [60, 90, 33])
def test_flip_mirrors_image(size):
    image, boxes = _image(40, 60), _boxes(40, 60)
    plain, _ = apply_view(image, boxes, View(size=size))
    flipped, _ = apply_view(image, boxes, View(size=size, flip=True))
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_flip_moves_a_hand_made_box():
    image = _image(40, 60)  # h=40, w=60
    box = torch.tensor([[10.0, 5.0, 20.0, 15.0]])
    _, b = apply_view(image, box, View(size=60, flip=True))
    assert b.tolist() == [[40.0, 5.0, 50.0, 15.0]]
    _, b = apply_view(image, box, View(size=120))  # x2
    assert b.tolist() == [[20.0, 10.0, 40.0, 30.0]]
    _, b = apply_view(image, box, View(size=120, flip=True))  # x2, then mirrored in the 120 px wide view
    assert b.tolist() == [[80.0, 10.0, 100.0, 30.0]]


def test_flipped_box_covers_the_flipped_pixels():
    image = torch.zeros((3, 30, 50), dtype=torch.uint8)
    image[:, 4:9, 6:17] = 255  # a white block exactly at box [6, 4, 17, 9]
    x, b = apply_view(image, torch.tensor([[6.0, 4.0, 17.0, 9.0]]), View(size=50, flip=True))
    ys, xs = torch.nonzero(x[0] > 0, as_tuple=True)
    assert b[0].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("hw", [(40, 60), (60, 40), (128, 128), (31, 97), (200, 75)])
@pytest.mark.parametrize("size", [48, 128, 333])
@pytest.mark.parametrize("flip", [False, True])
def test_boxes_to_original_inverts_apply_view(hw, size, flip):
    h, w = hw
    boxes = _boxes(h, w, seed=size)
    view = View(size=size, flip=flip)
    x, b = apply_view(_image(h, w), boxes, view)
    assert tuple(x.shape[1:]) == view.output_size(h, w)
    back = boxes_to_original(b, view, (h, w))
    assert torch.allclose(back, boxes, atol=1e-4)
    if flip:  # the mapped boxes really are mirrored, not left alone
        assert not torch.allclose(b, apply_view(_image(h, w), boxes, View(size=size))[1])


def test_empty_boxes():
    x, b = apply_view(_image(20, 30), torch.zeros((0, 4)), View(size=60, flip=True))
    assert b.shape == (0, 4) and x.shape == (3, 40, 60)
    _, b = apply_view(_image(20, 30), torch.zeros((0,)), View(size=60, flip=True))  # flat empty list
    assert b.shape == (0, 4)
    assert boxes_to_original(torch.zeros((0,)), View(size=60, flip=True), (20, 30)).shape == (0, 4)


def test_float_input_is_not_modified():
    image = _image(20, 30)
    as_float = image.float()
    before = as_float.clone()
    x, _ = apply_view(as_float, torch.zeros((0, 4)), View(size=30))
    assert torch.equal(as_float, before)
    assert torch.equal(x, apply_view(image, torch.zeros((0, 4)), View(size=30))[0])


@pytest.mark.parametrize(
    "hw, size, expected",
    [((40, 60), 120, (80, 120)), ((60, 40), 120, (120, 80)), ((100, 100), 64, (64, 64)), ((30, 97), 192, (59, 192))],
)
def test_output_size_keeps_aspect(hw, size, expected):
    h, w = hw
    out = View(size=size).output_size(h, w)
    assert out == expected
    assert max(out) == size
    assert abs(out[0] / out[1] - h / w) <= 0.5 / min(out)  # only rounding changes the aspect


def test_output_size_never_zero():
    assert View(size=16).output_size(2, 1000) == (1, 16)


def test_policy_canvas_and_views():
    for sizes, canvas in [((192,), 192), ((100,), 128), ((64, 200, 150), 224), ((32,), 32), ((33,), 64)]:
        policy = ViewPolicy(sizes=sizes)
        assert policy.canvas == canvas and policy.canvas % 32 == 0 and policy.canvas >= max(sizes)
    policy = ViewPolicy(sizes=(96, 128), flip_prob=0.5)
    assert policy.all_views() == [View(96), View(96, True), View(128), View(128, True)]
    assert policy.eval_view() == View(size=128, flip=False)
    assert ViewPolicy(sizes=(96,), flip_prob=0.0).all_views() == [View(96)]


def test_policy_sample_draws_every_view_and_is_seeded():
    policy = ViewPolicy(sizes=(96, 128), flip_prob=0.5)
    rng = random.Random(0)
    drawn = [policy.sample(rng) for _ in range(200)]
    assert set(drawn) == set(policy.all_views())
    assert 60 < sum(v.flip for v in drawn) < 140
    rng2 = random.Random(0)
    assert [policy.sample(rng2) for _ in range(200)] == drawn
    never = ViewPolicy(sizes=(96,), flip_prob=0.0)
    assert {never.sample(rng) for _ in range(50)} == {View(96)}
