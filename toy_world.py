"""The toy world: a procedural renderer of captioned short videos, the CartPole of video alignment.

Videos are `[B, F, 3, H, W]` floats in [0, 1] (default 8 frames of 32x32) on a black background:
one coloured shape that moves left/right/up/down, falls with gravity (accelerating), bounces, or
stays still; or two shapes where the first pushes the second. Prompts follow a fixed grammar
("a red square falling", "a blue circle pushing a green triangle") so the analytic rewards below
can parse what the video should show. A fixed subset of combinations is HELD OUT of
pre-training; alignment is evaluated on it.

The world's analytic rewards and judge follow the world's code: ToyReward (the `toy[:dimension]` reward
spec) and ToyJudge (`judge[:dimension]`), which rewards.py registers with its real reward models.
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


# ----------------------------------------------------------------------------------------------
# The toy world's analytic rewards and judge
# ----------------------------------------------------------------------------------------------
PALETTE = torch.tensor([(0.0, 0.0, 0.0)] + list(COLORS.values()))  # black background first
COLOR_NAMES = list(COLORS)
TOY_DIMENSIONS = {  # dimension -> short aliases accepted in specs
    "visual_quality": ["quality", "vq"],
    "temporal_consistency": ["temporal", "tc", "consistency"],
    "dynamic_degree": ["dynamic", "dd", "dynamics"],
    "text_alignment": ["text", "ta", "alignment"],
    "physics": ["phys"],
    "mean": ["global", "all"],
    "frame": ["framewise", "image"],
}


def _soft_centroid(mask):
    """mask [B, F, H, W] -> centroid [B, F, 2] (x, y in pixels) and mass [B, F]."""
    B, F, H, W = mask.shape
    ys = torch.arange(H, dtype=mask.dtype, device=mask.device).view(1, 1, H, 1)
    xs = torch.arange(W, dtype=mask.dtype, device=mask.device).view(1, 1, 1, W)
    mass = mask.sum((2, 3))
    # one pixel of prior mass at the frame centre: an (almost) empty mask gets a well-defined centroid
    # instead of a ratio of two round-off-sized numbers (which made scores depend on batch composition)
    cx = ((mask * xs).sum((2, 3)) + (W - 1) / 2) / (mass + 1)
    cy = ((mask * ys).sum((2, 3)) + (H - 1) / 2) / (mass + 1)
    return torch.stack([cx, cy], -1), mass


def _template(shape, c, r, H, W):
    """Soft shape templates [B, F, H, W] at centroids c [B, F, 2] with half-size r [B, F]."""
    ys = torch.arange(H, dtype=c.dtype, device=c.device).view(1, 1, H, 1)
    xs = torch.arange(W, dtype=c.dtype, device=c.device).view(1, 1, 1, W)
    dx, dy, r = xs - c[..., 0, None, None], ys - c[..., 1, None, None], r[..., None, None]
    step = lambda z: torch.sigmoid(z / 0.25)  # noqa: E731 (a soft edge a quarter pixel wide)
    if shape == "square":
        return step(r + 0.5 - dx.abs()) * step(r + 0.5 - dy.abs())
    if shape == "circle":
        return step(1.13 * r + 0.5 - (dx * dx + dy * dy).sqrt())
    dy = dy + r / 3  # the mass centroid of an apex-up triangle sits r/3 below its box centre
    return step(r + 0.5 - dy.abs()) * step(r * 1.3 * (dy + r) / (2 * r) + 0.5 - dx.abs())


class ToyReward:
    """Analytic toy-world scores, each in [0, 1], all differentiable w.r.t. the pixels:
    visual_quality (pixels close to the flat palette: noise, speckle and blur lower it; times the
    object's presence),
    temporal_consistency (stable object area and colour, little frame-to-frame change, times the
    object's presence: flicker and vanishing objects lower it, and so, mildly, does fast motion, as
    with real consistency metrics), dynamic_degree (how far
    the objects move), text_alignment (colour, shape and motion as the prompt says), physics (falls
    accelerate, constant speed otherwise, a pushed object keeps still until its pusher touches it and
    stays ahead of it after); frame, the
    image-style reward (per-frame quality and colour/shape alignment, blind to frame order).
    `with_color_accuracy=True` adds "color_accuracy" to the scores (color_accuracy(): 0 or 1 per video, not
    differentiable), an evaluation figure rather than a dimension: no spec selects it, "mean" leaves it out."""
    differentiable = True
    num_frames = None  # takes the video as it comes
    resolution = None
    fps = None  # frame-count based: the clip's rate does not matter

    def __init__(self, dimension="temporal_consistency", with_color_accuracy=False):
        self.dimension = canonical_toy_dimension(dimension)
        self.dimensions = list(TOY_DIMENSIONS) + ["color", "shape", "motion"]
        self.name = f"toy:{self.dimension}"
        self.with_color_accuracy = with_color_accuracy

    def pixel_quality(self, videos):
        """Per-pixel closeness to the palette [B, F, H, W] in [0, 1]."""
        pal = PALETTE.to(videos)
        d = (videos.unsqueeze(2) - pal.view(1, 1, -1, 3, 1, 1)).pow(2).sum(3)  # [B, F, K, H, W]
        dmin = -0.01 * torch.logsumexp(-d / 0.01, dim=2)  # soft minimum over palette colours
        return torch.exp(-dmin.clamp(min=0) / 0.05)

    def patch_scores(self, videos, prompts, grid=(2, 4, 4)):
        """Visual quality per patch [B, Fp, Hp, Wp] (Fp groups of frames x Hp x Wp cells)."""
        q = self.pixel_quality(videos)  # [B, F, H, W]; cells need not divide the video evenly
        return torch.nn.functional.adaptive_avg_pool3d(q[:, None], tuple(grid))[:, 0]

    def color_masks(self, videos):
        """Soft membership of every pixel in each palette colour [B, F, K, H, W] (K without black)."""
        pal = PALETTE[1:].to(videos)
        d = (videos.unsqueeze(2) - pal.view(1, 1, -1, 3, 1, 1)).pow(2).sum(3)
        return torch.exp(-d / 0.06)

    def __call__(self, videos, prompts):
        specs = [parse_prompt(p) for p in prompts]
        v = videos.float()
        B, F, C, H, W = v.shape
        bright = v.amax(2)
        fg = torch.sigmoid((bright - 0.35) / 0.05)  # [B, F, H, W] soft foreground
        cent, mass = _soft_centroid(fg)
        shape_area = (2 * HALF_SIZE * W / 32) ** 2

        # an object must be THERE for any video-level score: an empty clip is neither "consistent" nor
        # "high quality" (else blank videos hack both, as the first OnlineVPO and Gran-DPO runs found)
        area = mass / shape_area
        presence = (area / 0.5).clamp(max=1).mean(1)
        quality = self.pixel_quality(v).mean((1, 2, 3)) * presence

        # temporal consistency: area and colour stability + small raw frame-to-frame change
        area_stab = torch.exp(-(area[:, 1:] - area[:, :-1]).abs().mean(1) / 0.15)
        mean_col = (v * fg.unsqueeze(2)).sum((3, 4)) / (mass.unsqueeze(2) + 1e-4)  # [B, F, 3]
        col_stab = torch.exp(-(mean_col[:, 1:] - mean_col[:, :-1]).norm(dim=2).mean(1) / 0.1)
        pix_stab = torch.exp(-(v[:, 1:] - v[:, :-1]).abs().mean((1, 2, 3, 4)) / 0.05)
        temporal = (0.4 * area_stab + 0.3 * col_stab + 0.3 * pix_stab) * presence

        speed = (cent[:, 1:] - cent[:, :-1]).norm(dim=2)  # px / frame
        dynamic = 1 - torch.exp(-speed.mean(1) / 1.5)

        cmask = self.color_masks(v)  # [B, F, K, H, W]
        carea = cmask.sum((1, 3, 4))  # [B, K]
        color, shape, motion, physics = [], [], [], []
        for b, s in enumerate(specs):
            k1 = COLOR_NAMES.index(s["color"])
            targets = [k1] + ([COLOR_NAMES.index(s["color2"])] if "color2" in s else [])
            color.append(carea[b, targets].sum() / (carea[b].sum() + shape_area * 0.25))
            # shape: template IoU of the (first) object's colour mask against each shape
            m1 = cmask[b:b + 1, :, k1]
            c1, a1 = _soft_centroid(m1)
            ious = []
            for sh, fill in (("square", 4.0), ("circle", 4.0), ("triangle", 2.6)):
                t = _template(sh, c1.detach(), (a1.detach() / fill).clamp(min=1).sqrt() - 0.5, H, W)
                ious.append((torch.minimum(m1, t).sum((2, 3)) / (torch.maximum(m1, t).sum((2, 3)) + 1e-4)).mean())
            shape.append(torch.softmax(torch.stack(ious) * 30, 0)[SHAPES.index(s["shape"])])
            mo, ph = self._motion_physics(s, cent[b], cmask[b], F)
            motion.append(mo)
            physics.append(ph)
        color, shape, motion, physics = (torch.stack(x) for x in (color, shape, motion, physics))
        text = (color + shape + motion) / 3
        out = {"visual_quality": quality, "temporal_consistency": temporal, "dynamic_degree": dynamic,
               "text_alignment": text, "physics": physics, "color": color, "shape": shape, "motion": motion}
        out["mean"] = (quality + temporal + dynamic + text + physics) / 5
        # what an image reward model (PickScore, HPSv2, aesthetic) scored frame by frame would see: quality
        # and image-text alignment of each frame, averaged; blind to frame order, hence to motion
        out["frame"] = (quality + color + shape) / 3
        out["reward"] = out[self.dimension]
        if self.with_color_accuracy:  # (last, after "reward": the order the evaluations logged it in)
            out["color_accuracy"] = self.color_accuracy(videos, prompts)
        return out

    @staticmethod
    def _motion_physics(s, c, cmask, F):
        """Motion score and physics score of one video; c [F, 2] foreground centroids."""
        sig = torch.sigmoid
        m = s["motion"]
        T = max(F - 1, 1)
        if m == "pushing":  # track each object by its colour
            c1, _ = _soft_centroid(cmask[None, :, COLOR_NAMES.index(s["color"])])
            c2, _ = _soft_centroid(cmask[None, :, COLOR_NAMES.index(s["color2"])])
            c1, c2 = c1[0], c2[0]
            half = F // 2
            pusher = sig(((c1[-1, 0] - c1[0, 0]) / T - 0.6) / 0.2)
            pushed_late = sig(((c2[-1, 0] - c2[half, 0]) / max(F - 1 - half, 1) - 0.6) / 0.2)
            pushed_still_early = torch.exp(-(c2[min(2, F - 1), 0] - c2[0, 0]).abs() / 2)
            order = sig((c2[:, 0] - c1[:, 0] - 2) / 1).mean()  # the pushed one stays ahead: no passing through
            # no motion without a cause: in a frame step where the pusher does not come within 2 half-sizes
            # (+1 px) of where the pushed one stood, the pushed one must keep still (cut: 0.4 px/frame)
            touch = 2 * HALF_SIZE * cmask.shape[-1] / 32 + 1
            apart = sig((c2[:-1, 0] - c1[1:, 0] - touch) / 0.5)
            moves = apart * (c2[1:, 0] - c2[:-1, 0]).abs()
            drift = moves.amax() if moves.numel() else moves.new_zeros(())  # (one frame, as VADER may decode: no drift)
            return pusher * pushed_late * pushed_still_early, order * sig((0.4 - drift) / 0.08)
        vel = (c[1:] - c[:-1])  # [F-1, 2]
        acc = vel[1:] - vel[:-1]
        disp = (c[-1] - c[0]) / T
        if m in DIRECTIONS:
            d = torch.tensor(DIRECTIONS[m], dtype=c.dtype, device=c.device)
            return sig(((disp * d).sum() - 0.6) / 0.2), torch.exp(-acc.norm(dim=1).mean() / 1.5)
        if m == "falling":
            return sig((disp[1] - 0.6) / 0.2) * torch.exp(-disp[0].abs() / 0.5), sig((acc[:, 1].mean() - 0.15) / 0.1)
        if m == "bouncing":
            y = c[:, 1]
            y_max = 0.3 * torch.logsumexp(y / 0.3, 0)
            down_up = sig((y_max - y[0] - 3) / 1.0) * sig((y_max - y[-1] - 1.5) / 0.7)
            return down_up, sig((acc[:3, 1].mean() - 0.3) / 0.2)
        still = torch.exp(-(c[-1] - c[0]).norm() / 1.5) * torch.exp(-vel.norm(dim=1).mean() / 1.0)
        return still, torch.exp(-vel.norm(dim=1).mean() / 1.0)

    def color_accuracy(self, videos, prompts):
        """1 where the video's dominant palette colours are the prompt's colours (the top one for a
        single object, the top two for a push), else 0: [B]."""
        carea = self.color_masks(videos.float()).sum((1, 3, 4)).cpu()
        acc = []
        for b, p in enumerate(prompts):
            s = parse_prompt(p)
            want = {COLOR_NAMES.index(s["color"])} | ({COLOR_NAMES.index(s["color2"])} if "color2" in s else set())
            acc.append(float(set(carea[b].topk(len(want)).indices.tolist()) == want))
        return torch.tensor(acc)


class ToyJudge:
    """The toy world's binary judge, standing in for a VLM asked a yes/no question about the object
    dynamics ("Does the red square fall downwards with increasing speed?"): yes when the motion, the
    physics and the colour are all right (each score > 0.5). Answers {0, 1}; not differentiable."""
    differentiable = False
    num_frames = None
    resolution = None
    fps = None
    dimensions = ["yes", "p_yes", "motion", "physics", "color"]
    name = "toy:judge"

    def __init__(self, dimension="yes"):
        self.scorer = ToyReward()
        self.dimension = dimension

    def question(self, prompt):
        return default_question(prompt)

    @torch.no_grad()
    def __call__(self, videos, prompts):
        s = self.scorer(videos, prompts)
        p_yes = torch.minimum(torch.minimum(s["motion"], s["physics"]), s["color"])
        out = {"yes": (p_yes > 0.5).float(), "p_yes": p_yes, "motion": s["motion"], "physics": s["physics"],
               "color": s["color"]}
        out["reward"] = out[self.dimension] if self.dimension in out else out["yes"]
        return out


def default_question(prompt):
    """The yes/no question asked about a dynamics prompt (the toy judge and a VLM get the same one)."""
    try:
        s = parse_prompt(prompt)
    except ValueError:
        return f"Does this video faithfully show: {prompt}? Answer yes or no."
    obj = f"the {s['color']} {s['shape']}"
    q = {"falling": f"Does {obj} fall downwards with increasing speed?",
         "bouncing": f"Does {obj} fall, hit the ground and bounce back up?",
         "pushing": f"Does {obj} move right, touch the {s.get('color2')} {s.get('shape2')} and push it along?",
         "staying still": f"Does {obj} stay still?"}.get(s["motion"], f"Does {obj} keep {s['motion']} at a steady speed?")
    return q + " Answer yes or no."


def canonical_toy_dimension(dim):
    for name, aliases in TOY_DIMENSIONS.items():
        if dim == name or dim in aliases:
            return name
    valid = ", ".join(f"{k} ({'/'.join(v)})" for k, v in TOY_DIMENSIONS.items())
    raise ValueError(f"unknown toy reward dimension {dim!r}: valid are {valid}")
