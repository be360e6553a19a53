"""The toy world: a procedural renderer of captioned short videos, the CartPole of video alignment.

Videos are `[B, F, 3, H, W]` floats in [0, 1] (default 8 frames of 32x32) on a black background:
one coloured shape that moves left/right/up/down, falls with gravity (accelerating), bounces, or
stays still; or two shapes where the first pushes the second. Prompts follow a fixed grammar
("a red square falling", "a blue circle pushing a green triangle") so the analytic rewards in
rewards.py can parse what the video should show. A fixed subset of combinations is HELD OUT of
pre-training; alignment is evaluated on it.
"""
import itertools
import random

import torch

COLORS = {  # name -> RGB in [0, 1]; saturated and far apart so the colour detector is unambiguous
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.25, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "magenta": (1.0, 0.2, 1.0),
    "cyan": (0.1, 0.9, 1.0),
}
SHAPES = ["square", "circle", "triangle"]
MOTIONS = ["moving left", "moving right", "moving up", "moving down", "falling", "bouncing", "staying still"]
DIRECTIONS = {"moving left": (-1.0, 0.0), "moving right": (1.0, 0.0), "moving up": (0.0, -1.0), "moving down": (0.0, 1.0)}
CATEGORY = {m: "moving" for m in DIRECTIONS} | {"falling": "falling", "bouncing": "falling", "staying still": "still",
                                                 "pushing": "interaction"}
HALF_SIZE = 4.5  # half the side of a shape in pixels at 32x32 (scaled with the frame size)


def parse_prompt(prompt):
    """'a red square falling' -> dict(color, shape, motion[, color2, shape2]); raises ValueError if off-grammar."""
    words = prompt.lower().strip().rstrip(".").split()
    try:
        if words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
            raise ValueError
        spec = {"color": words[1], "shape": words[2]}
        rest = " ".join(words[3:])
        if rest in MOTIONS:
            spec["motion"] = rest
        elif words[3] == "pushing" and words[4] == "a" and words[5] in COLORS and words[6] in SHAPES and len(words) == 7:
            spec.update(motion="pushing", color2=words[5], shape2=words[6])
        else:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"not a toy-world prompt: {prompt!r} (expected e.g. 'a red square falling' or "
                         f"'a red square pushing a blue circle')") from None
    return spec


def _single_prompts():
    return [f"a {c} {s} {m}" for c, s, m in itertools.product(COLORS, SHAPES, MOTIONS)]


def _push_prompts():
    return [f"a {c1} {s1} pushing a {c2} {s2}" for c1, c2 in itertools.permutations(COLORS, 2)
            for s1, s2 in itertools.product(SHAPES, SHAPES)]


def _is_held_out(prompt):
    # A fixed, balanced ~1/7 of the single-object combinations and ~1/9 of the pushes: every colour,
    # shape and motion is still seen in training, only some COMBINATIONS are new at evaluation.
    s = parse_prompt(prompt)
    ci, si = list(COLORS).index(s["color"]), SHAPES.index(s["shape"])
    if s["motion"] == "pushing":
        return (ci + 2 * list(COLORS).index(s["color2"]) + SHAPES.index(s["shape2"]) + si) % 9 == 4
    return (ci + 3 * si + MOTIONS.index(s["motion"])) % 7 == 3


ALL_PROMPTS = _single_prompts() + _push_prompts()
TRAIN_PROMPTS = [p for p in ALL_PROMPTS if not _is_held_out(p)]
HELDOUT_PROMPTS = [p for p in ALL_PROMPTS if _is_held_out(p)]
DYNAMICS_TRAIN = [p for p in TRAIN_PROMPTS if parse_prompt(p)["motion"] != "staying still"]  # objects that move
DYNAMICS_HELDOUT = [p for p in HELDOUT_PROMPTS if parse_prompt(p)["motion"] != "staying still"]
PROMPT_LISTS = {"toy_train": TRAIN_PROMPTS, "toy_heldout": HELDOUT_PROMPTS,
                "toy_dynamics_train": DYNAMICS_TRAIN, "toy_dynamics_heldout": DYNAMICS_HELDOUT}
VOCAB = sorted({w for p in ALL_PROMPTS for w in p.split()})


def trajectory(spec, num_frames, size, rng):
    """Centre positions [F, 2] (x, y in pixels, y down) for the main object (and [F, 2] for the
    pushed one, or None). Gravity is g px/frame^2: y = y0 + g f^2 / 2 accelerates, as physics wants."""
    H, W = size
    r = HALF_SIZE * W / 32
    T = max(num_frames - 1, 1)
    f = torch.arange(num_frames, dtype=torch.float32)
    m = spec["motion"]
    if m in DIRECTIONS:
        dx, dy = DIRECTIONS[m]
        v = rng.uniform(1.6, 2.4) * W / 32 * 7 / T
        span = v * T
        x0 = rng.uniform(r + 1 + span * (dx < 0), W - 2 - r - span * (dx > 0)) if dx else rng.uniform(r + 1, W - 2 - r)
        y0 = rng.uniform(r + 1 + span * (dy < 0), H - 2 - r - span * (dy > 0)) if dy else rng.uniform(r + 1, H - 2 - r)
        return torch.stack([x0 + dx * v * f, y0 + dy * v * f], 1), None
    if m == "falling":
        g = rng.uniform(0.55, 0.7) * H / 32 * (7 / T) ** 2
        y0 = rng.uniform(r + 1, H - 2 - r - g * T * T / 2)
        x0 = rng.uniform(r + 1, W - 2 - r)
        return torch.stack([torch.full_like(f, x0), y0 + g * f * f / 2], 1), None
    if m == "bouncing":  # falls from near the top, reflects off the floor with restitution 0.7
        g, floor = rng.uniform(1.6, 2.0) * H / 32 * (7 / T) ** 2, H - 2 - r
        y, vy, ys = rng.uniform(r + 1, r + 4), 0.0, []
        for _ in range(num_frames):
            ys.append(y)
            vy += g
            y += vy
            if y > floor:
                y, vy = floor - (y - floor) * 0.7, -vy * 0.7
        x0 = rng.uniform(r + 1, W - 2 - r)
        return torch.stack([torch.full_like(f, x0), torch.tensor(ys)], 1), None
    if m == "staying still":
        return torch.tensor([[rng.uniform(r + 1, W - 2 - r), rng.uniform(r + 1, H - 2 - r)]]).repeat(num_frames, 1), None
    # pushing: the pusher moves right, touches the other shape, then both move right together
    v = rng.uniform(1.4, 1.8) * W / 32 * 7 / T
    y0 = rng.uniform(r + 1, H - 2 - r)
    x1 = rng.uniform(1.3 * r + 1, 1.3 * r + 2)
    x2 = x1 + 2 * r + rng.uniform(0.3, 0.5) * v * T
    xs1 = x1 + v * f
    xs2 = torch.maximum(torch.full_like(f, x2), xs1 + 2 * r)
    shift = torch.clamp(xs2[-1] - (W - 1.5 - r), min=0)  # keep the pushed shape inside the frame
    return torch.stack([xs1 - shift, torch.full_like(f, y0)], 1), torch.stack([xs2 - shift, torch.full_like(f, y0)], 1)


def shape_mask(shape, cx, cy, r, H, W):
    """Hard binary mask [..., H, W] of a shape centred at (cx, cy) (tensors [...]) with half-size r."""
    ys = torch.arange(H, dtype=torch.float32).view(H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, W)
    dx, dy = xs - cx[..., None, None], ys - cy[..., None, None]
    if shape == "square":
        m = (dx.abs() <= r) & (dy.abs() <= r)
    elif shape == "circle":
        m = dx * dx + dy * dy <= (1.13 * r) ** 2  # same area as the square
    elif shape == "triangle":  # apex up, base at the bottom
        m = (dy.abs() <= r) & (dx.abs() <= r * (dy + r) / (2 * r) * 1.3)
    else:
        raise ValueError(shape)
    return m.float()


def render(prompts, num_frames=8, height=32, width=32, seed=0):
    """Ground-truth videos [B, F, 3, H, W] in [0, 1] for toy prompts; positions/speeds drawn from `seed`."""
    rng = random.Random(seed)
    out = torch.zeros(len(prompts), num_frames, 3, height, width)
    r = HALF_SIZE * width / 32
    for i, p in enumerate(prompts):
        spec = parse_prompt(p)
        pos1, pos2 = trajectory(spec, num_frames, (height, width), rng)
        layers = [(spec["shape"], spec["color"], pos1)]
        if pos2 is not None:
            layers = [(spec["shape2"], spec["color2"], pos2)] + layers  # the pusher is drawn on top
        for shape, color, pos in layers:
            m = shape_mask(shape, pos[:, 0], pos[:, 1], r, height, width)[:, None]  # [F, 1, H, W]
            col = torch.tensor(COLORS[color]).view(1, 3, 1, 1)
            out[i] = out[i] * (1 - m) + col * m
    return out


# Corruptions used by tests and by the README's "ceiling vs corrupted" table: each one is a defect
# that one of the toy rewards is built to notice.
def corrupt(videos, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return (videos + 0.25 * torch.randn(videos.shape, generator=g)).clamp(0, 1)
    if kind == "flicker":  # every other frame dims and loses pixels
        v = videos.clone()
        v[:, 1::2] *= 0.45
        return v
    if kind == "blur":
        k = torch.ones(3, 1, 5, 5) / 25
        B, F, C, H, W = videos.shape
        x = torch.nn.functional.conv2d(videos.reshape(B * F, C, H, W), k, padding=2, groups=3)
        return x.reshape(B, F, C, H, W)
    if kind == "reverse":  # plays the clip backwards: wrong direction, a fall that decelerates
        return videos.flip(1)
    if kind == "freeze":  # first frame held: no motion at all
        return videos[:, :1].expand_as(videos).clone()
    raise ValueError(f"unknown corruption {kind!r}")
