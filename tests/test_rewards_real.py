"""Real reward models, loaded from tiny random checkpoints through the production from_pretrained path."""
import pytest
import torch

import rewards
import toy_world


def test_videoscore_loads_and_scores(videoscore_folder):
    folder, base, head = videoscore_folder
    r = rewards.load_reward(f"videoscore:dynamic_degree@{folder}")
    assert r.name == "videoscore:dynamic_degree" and r.differentiable
    videos = torch.rand(2, 9, 3, 16, 16)
    out = r(videos, ["a red square falling", "a cat"])
    assert set(rewards.VIDEOSCORE_DIMENSIONS) <= set(out) and out["reward"].shape == (2,)
    assert torch.equal(out["reward"], out["dynamic_degree"])
    assert torch.equal(r.head.weight, head)  # the head came from the checkpoint, by name
    assert all(torch.equal(a, b) for a, b in zip(r.model.state_dict().values(), base.state_dict().values()))
    # the video matters (a random one-layer model pooled at the trailing text token moves little: contrast
    # a black clip with a white one, and ask only that the scores differ)
    black, white = (r(torch.full((2, 9, 3, 16, 16), v), ["a red square falling", "a cat"])["reward"] for v in (0.0, 1.0))
    assert (black - white).abs().min() > 0


def test_videoscore_gradient_reaches_the_pixels_and_patches(videoscore_folder):
    r = rewards.load_reward(f"videoscore@{videoscore_folder[0]}")
    videos = torch.rand(1, 4, 3, 16, 16, requires_grad=True)
    r(videos, ["a red square falling"])["reward"].sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    assert r.patch_scores(videos.detach(), ["x"], (1, 2, 2)).shape == (1, 1, 2, 2)


def test_videoscore_errors(videoscore_folder, tmp_path):
    with pytest.raises(ValueError, match="unknown videoscore dimension 'beauty'"):
        rewards.parse_reward_spec("videoscore:beauty")
    with pytest.raises(FileNotFoundError, match="pass a local folder"):
        rewards.load_reward(f"videoscore@{tmp_path}/nothing-here")


def test_vlm_judge_p_yes(qwen_vl_folder):
    judge = rewards.load_reward(f"vlm@{qwen_vl_folder}")
    assert judge.name == "vlm:yes"
    videos = torch.rand(2, 8, 3, 32, 40, requires_grad=True)
    out = judge(videos, ["a red square falling", "a blue circle pushing a green square"])
    assert out["p_yes"].shape == (2,) and ((out["p_yes"] > 0) & (out["p_yes"] < 1)).all()
    assert set(out["reward"].tolist()) <= {0.0, 1.0} and torch.equal(out["yes"], (out["p_yes"] > 0.5).float())
    out["p_yes"].sum().backward()  # P(yes) is differentiable: the frames were prepared in torch
    assert videos.grad.abs().sum() > 0
    pixels, grid, text, extra = judge.video_inputs(torch.rand(1, 5, 3, 30, 60))
    assert grid.tolist() == [[3, 2, 4]] and pixels.shape == (24, 3 * 2 * 14 * 14)
    assert extra == {}  # frame rate unknown: Qwen2.5-VL's default of 1 s per temporal patch
    judge.fps = 10.0  # all 5 frames of a clip at 10 fps: a temporal patch of 2 frames spans 0.2 s
    assert torch.allclose(judge.video_inputs(torch.rand(1, 5, 3, 30, 60))[3]["second_per_grid_ts"], torch.tensor([0.2]))
    assert text == "<|vision_start|>" + "<|video_pad|>" * (3 * 2 * 4 // 4) + "<|vision_end|>"  # no timestamps
    assert judge.chat("Is it?") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                    f"{rewards.VIDEO_SLOT}Is it?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown vlm dimension 'gpt5'"):
        rewards.parse_reward_spec("vlm:gpt5")


QWEN_STYLE_TEMPLATE = (  # the shape of the Qwen-VL chat templates, with a system prompt of its own and a think block
    "{{ '<|im_start|>system\\nJudge videos.<|im_end|>\\n' }}{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{% for c in m.content %}{% if c.type == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")


@pytest.mark.parametrize("version", ["3", "3-moe"])
def test_qwen3_vl_judge_matches_the_processors_input(tmp_path, version):
    """Qwen3-VL: every temporal patch is its own <t seconds><|vision_start|>...<|vision_end|> block. Our
    torch preprocessing must give the model exactly what transformers' Qwen3-VL processor code gives it."""
    import types
    import tiny_models
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata
    tiny_models.build_qwen_vl(str(tmp_path / "q3"), version=version)
    judge = rewards.load_reward(f"vlm@{tmp_path / 'q3'}", fps=16)
    assert judge.model.config.model_type == {"3": "qwen3_vl", "3-moe": "qwen3_vl_moe"}[version]
    assert judge.timestamps and judge.patch == 16 and judge.mean == [0.5] * 3
    videos = torch.rand(2, 9, 3, 32, 64, requires_grad=True)  # multiples of 32: no resize, so exact comparison
    prompts = ["a red square falling", "a cat"]
    out = judge(videos, prompts)
    assert out["p_yes"].shape == (2,) and ((out["p_yes"] > 0) & (out["p_yes"] < 1)).all()
    out["p_yes"].sum().backward()
    assert videos.grad.abs().sum() > 0
    # the reference: transformers' own patchify and placeholder code (its classes need torchvision to be
    # built here, so their methods are called on stand-ins), with the frames our judge samples (8 of 9)
    idx = [0, 1, 2, 3, 5, 6, 7, 8]
    x = (videos.detach()[:, idx] - 0.5) / 0.5
    pixels = Qwen3VLVideoProcessor.patchify(None, x, patch_size=16, merge_size=2, temporal_patch_size=2)[0]
    proc = types.SimpleNamespace(video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2),
                                 vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                                 video_token="<|video_pad|>")
    proc._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(proc, *a)
    grid = torch.tensor([[4, 2, 4]] * 2)
    placeholder = Qwen3VLProcessor.replace_video_token(
        proc, {"video_grid_thw": grid, "video_metadata": [VideoMetadata(total_num_frames=9, fps=16, frames_indices=idx)]}, 0)
    assert placeholder.startswith("<0.0 seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|><0.2 seconds>")
    ours_pixels, ours_grid, ours_text, _ = judge.video_inputs(videos.detach())
    assert ours_text == placeholder and torch.equal(ours_grid, grid) and torch.allclose(ours_pixels, pixels.flatten(0, 1))
    # ... and the logits of a hand-built Qwen3-VL chat turn (no default system prompt), one video at a time
    for i, prompt in enumerate(prompts):
        text = (f"<|im_start|>user\n{placeholder}{toy_world.default_question(prompt)}<|im_end|>\n"
                f"<|im_start|>assistant\n")
        ids = judge.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = judge.model(input_ids=ids, mm_token_type_ids=(ids == judge.model.config.video_token_id).int() * 2,
                                 pixel_values_videos=pixels[i], video_grid_thw=grid[:1]).logits[0, -1]
        p = torch.softmax(logits[judge.yes_ids + judge.no_ids], -1)[: len(judge.yes_ids)].sum()
        assert torch.allclose(out["p_yes"][i], p, atol=1e-5)
    # timestamps follow the clip's frame rate
    judge.fps = 4.0
    assert judge.video_inputs(videos.detach())[2].startswith("<0.1 seconds><|vision_start|>")


def test_qwen_vl_uses_the_checkpoints_chat_template(tmp_path):
    import tiny_models
    tiny_models.build_qwen_vl(str(tmp_path / "q"), version="3", chat_template=QWEN_STYLE_TEMPLATE)
    r = rewards.load_reward(f"videoscore2@{tmp_path / 'q'}", fps=8)
    assert r.chat("Rate it.") == (
        "<|im_start|>system\nJudge videos.<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "Rate it.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")  # think block closed
    out = r(torch.rand(1, 4, 3, 32, 32), ["a cat"])
    assert 0 < out["visual_quality"].item() <= 5 and 1 < out["visual_quality_expected"].item() < 5
    tiny_models.build_clip(str(tmp_path / "clip"))  # not a Qwen-VL: refused before its weights load
    with pytest.raises(ValueError, match="clip model: the local VLM rewards take qwen2_vl"):
        rewards.load_reward(f"vlm@{tmp_path / 'clip'}")


def test_clip_frame_rewards(tmp_path):
    import tiny_models
    model = tiny_models.build_clip(str(tmp_path / "clip"), aesthetic=True)
    videos = torch.rand(2, 3, 3, 20, 36, requires_grad=True)
    prompts = ["a red square falling", "a cat"]
    pick = rewards.load_reward(f"pickscore@{tmp_path / 'clip'}")
    out = pick(videos, prompts)
    # by hand: CLIP preprocessing (shortest side 28, centre crop), logit_scale * cosine, mean over frames
    x = rewards.resize_center_crop(videos.detach(), 28, rewards.CLIP_MEAN, rewards.CLIP_STD)
    assert x.shape == (2, 3, 3, 28, 28)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=x.flatten(0, 1)).pooler_output, dim=-1)
        tok = pick.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = torch.nn.functional.normalize(model.get_text_features(**tok).pooler_output, dim=-1)
    want = (model.logit_scale.exp() * (img.view(2, 3, -1) * txt[:, None]).sum(-1)).mean(1)
    assert torch.allclose(out["reward"], want, atol=1e-5)
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0  # differentiable, for VADER
    clip = rewards.load_reward(f"clipscore@{tmp_path / 'clip'}")(videos.detach(), prompts)["reward"]
    assert torch.allclose(clip, (100 * (img.view(2, 3, -1) * txt[:, None]).sum(-1)).mean(1).clamp(min=0), atol=1e-4)
    aes = rewards.load_reward(f"aesthetic:random@{tmp_path / 'clip'}")
    assert aes(videos.detach(), prompts)["reward"].shape == (2,) and aes.mlp is not None
    both = rewards.load_reward(f"pickscore@{tmp_path / 'clip'}*0.5+toy:quality")
    assert both.differentiable


def test_vader_with_a_real_frame_reward_end_to_end(tmp_path, tiny_folders):
    import json
    import os

    import tiny_models
    import vader_grad
    from helpers import run_main
    tiny_models.build_clip(str(tmp_path / "clip"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat playing piano\na dog surfing\n")
    out = run_main(vader_grad, ["--model", tiny_folders["wan"], "--reward", f"pickscore:random@{tmp_path / 'clip'}",
                                "--prompts", str(prompts), "--eval-prompts", str(prompts), "--num-frames", "9",
                                "--height", "16", "--width", "16", "--steps", "2", "--batch-size", "2",
                                "--sample-steps", "2", "--lora-rank", "4", "--diversity-prompts", "1",
                                "--diversity-seeds", "2", "--decode-frames", "alternate", "--out", str(tmp_path / "v")])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[-1]["eval"] and "eval/pickscore" in rows[0] and rows[1]["grad_norm"] > 0


# ---- VideoScore2 / VideoReward / VideoMAE / V-JEPA 2 -----------------------------------------
@pytest.fixture(scope="module")
def more_models(tmp_path_factory):
    import tiny_models
    d = tmp_path_factory.mktemp("more_rewards")
    tiny_models.build_videomae(str(d / "mae"))
    tiny_models.build_vjepa2(str(d / "jepa"))
    _, head = tiny_models.build_qwen_vl(str(d / "vr"), version="2", reward_head=1)
    return d, head


def test_videoscore2_soft_and_expected_scores(qwen_vl_folder):
    r = rewards.load_reward(f"videoscore2:physical_consistency_expected@{qwen_vl_folder}", fps=8)
    videos = torch.rand(2, 6, 3, 28, 28, requires_grad=True)
    prompts = ["a red square falling", "a cat"]
    out = r(videos, prompts)
    assert set(r.dimensions) <= set(out) and torch.equal(out["reward"], out["physical_consistency_expected"])
    # by hand: the logits at the third digit, after an empty think block and the first two (most likely) digits
    from string import Template
    queries = [Template(rewards.VIDEOSCORE2_QUERY).substitute(t2v_prompt=p) for p in prompts]
    answers = [rewards.VIDEOSCORE2_THINK + "(1) visual quality: "] * 2
    for line in ("(2) text-to-video alignment: ", "(3) physical/common-sense consistency: "):
        best = r.forward(videos.detach(), queries, answers)[:, r.score_ids].argmax(-1) + 1
        answers = [a + f"{k}\n{line}" for a, k in zip(answers, best.tolist())]
    logits = r.forward(videos.detach(), queries, answers)[:, r.score_ids]
    want = (torch.softmax(logits, -1) * torch.arange(1.0, 6.0)).sum(-1)
    assert torch.allclose(out["reward"], want, atol=1e-5) and ((want > 1) & (want < 5)).all()
    p = torch.softmax(logits / 0.7, -1)  # the reference read-out: best score x its share, at temperature 0.7
    assert torch.allclose(out["physical_consistency"], (p.argmax(-1) + 1) * p.max(-1).values, atol=1e-5)
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0


def test_videoreward_head_special_tokens_and_normalisation(more_models):
    import json
    d, head = more_models
    r = rewards.load_reward(f"videoreward@{d / 'vr'}", fps=8)
    assert torch.equal(r.head.weight, head) and r.name == "videoreward:overall"
    videos = torch.rand(2, 4, 3, 28, 56, requires_grad=True)
    raw = r(videos, ["a red square falling", "a cat"])
    assert torch.allclose(raw["overall"], raw["visual_quality"] + raw["motion_quality"] + raw["text_alignment"])
    # by hand: the last hidden state at each special token through the head
    hidden, ids = r.forward(videos.detach(), [rewards.VIDEOREWARD_PROMPT.format(text_prompt=p) for p in ["a red square falling", "a cat"]], hidden=True)
    pos = (ids == r.special_ids[1]).float().argmax(1)
    assert torch.allclose(raw["motion_quality"], (hidden[torch.arange(2), pos] @ head.T)[:, 0], atol=1e-5)
    raw["overall"].sum().backward()
    assert videos.grad.abs().sum() > 0
    json.dump({"inference_config": {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": 0.0, "MQ_std": 1.0, "TA_mean": -1.0,
                                    "TA_std": 0.5}}, open(d / "vr" / "model_config.json", "w"))
    normed = rewards.load_reward(f"videoreward:text_alignment@{d / 'vr'}", fps=8)(videos.detach(), ["a red square falling", "a cat"])
    assert torch.allclose(normed["visual_quality"], (raw["visual_quality"] - 1.0) / 2.0, atol=1e-5)
    assert torch.allclose(normed["reward"], (raw["text_alignment"] + 1.0) / 0.5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown videoreward dimension 'beauty'"):
        rewards.parse_reward_spec("videoreward:beauty")


def test_videomae_action_probability(more_models):
    d, _ = more_models
    r = rewards.load_reward(f"videomae@{d / 'mae'}")  # the target class is the one the prompt names
    videos = torch.rand(2, 3, 3, 20, 30, requires_grad=True)
    out = r(videos, ["a man playing guitar on a stage", "a dog juggling balls"])
    # by hand: 2 of the 3 frames (whole tubelets, none repeated), bilinear as the processor config says, and
    # the model built for 2 frames, as VADER builds it (num_frames = the decoded frame count)
    from transformers import VideoMAEForVideoClassification
    x = rewards.resize_center_crop(rewards.sample_frames(videos.detach(), 2), 32, rewards.IMAGENET_MEAN,
                                   rewards.IMAGENET_STD, mode="bilinear")
    with torch.no_grad():
        probs = torch.softmax(VideoMAEForVideoClassification.from_pretrained(d / "mae", num_frames=2)(pixel_values=x).logits, -1)
    assert torch.allclose(out["reward"], probs[[0, 1], [0, 1]], atol=1e-6)
    out["reward"].sum().backward()
    assert videos.grad.abs().sum() > 0
    fixed = rewards.load_reward(f"videomae:bouncing_ball@{d / 'mae'}")(videos.detach(), ["anything", "at all"])
    assert torch.allclose(fixed["reward"], probs[:, 3], atol=1e-6)
    with pytest.raises(ValueError, match="names no action class"):
        r(videos.detach(), ["a red square falling", "x"])
    with pytest.raises(ValueError, match="no class 'ballet'"):
        rewards.load_reward(f"videomae:ballet@{d / 'mae'}")


def test_vjepa2_consistency_ranks_a_steady_clip_above_flicker(more_models):
    d, _ = more_models
    r = rewards.load_reward(f"vjepa2@{d / 'jepa'}")
    g = torch.Generator().manual_seed(0)
    frame = torch.rand(3, 1, 3, 32, 32, generator=g)
    steady = frame.expand(3, 8, 3, 32, 32).clone().requires_grad_(True)
    flicker = torch.rand(3, 8, 3, 32, 32, generator=g)
    a, b = r(steady, ["x"] * 3)["reward"], r(flicker, ["x"] * 3)["reward"]
    assert (a > b).all(), (a, b)
    a.sum().backward()
    assert steady.grad.abs().sum() > 0
    assert r.patch_scores(flicker, ["x"] * 3, (1, 2, 2)).shape == (3, 1, 2, 2)


# ---- a judge behind an OpenAI-compatible server, tested against one on loopback --------------
class FakeServer:
    """A chat-completions server on 127.0.0.1: answers in the OpenAI format with top logprobs, after
    `fail_first` 503s; records every request it saw (headers and JSON bodies)."""

    def __init__(self, fail_first=0, logprobs=True, p_yes=0.8):
        import http.server
        import json
        import math
        import threading
        self.requests, self.fail_left = [], fail_first
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                if server.fail_left > 0:
                    server.fail_left -= 1
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b'{"error": "overloaded"}')
                    return
                top = [{"token": "Yes", "logprob": math.log(p_yes * 0.9)}, {"token": " yes", "logprob": math.log(p_yes * 0.1)},
                       {"token": "No", "logprob": math.log(1 - p_yes)}, {"token": "Maybe", "logprob": -9.0}]
                choice = {"index": 0, "message": {"role": "assistant", "content": "Yes"}, "finish_reason": "length",
                          "logprobs": {"content": [{"token": "Yes", "logprob": top[0]["logprob"], "top_logprobs": top}]}
                          if logprobs else None}
                data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_api_judge_reads_p_yes_from_logprobs_and_sends_frames(monkeypatch):
    import base64
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    srv = FakeServer(p_yes=0.8)
    try:
        judge = rewards.load_reward(f"api:Qwen/Qwen2.5-VL-7B-Instruct@{srv.url}")
        assert not judge.differentiable and judge.name == "api:Qwen/Qwen2.5-VL-7B-Instruct"
        out = judge(torch.rand(2, 6, 3, 16, 24), ["a red square falling", "a blue circle bouncing"])
        assert torch.allclose(out["p_yes"], torch.tensor([0.8, 0.8]), atol=1e-6)  # (0.72 + 0.08) / (0.8 + 0.2)
        assert torch.equal(out["yes"], torch.ones(2)) and torch.equal(out["reward"], out["yes"])
        path, headers, body = srv.requests[0]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-secret-123"
        assert body["model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and body["logprobs"] and body["max_tokens"] == 1
        content = body["messages"][0]["content"]
        images = [c for c in content if c["type"] == "image_url"]
        assert len(images) == 6 and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1])[:4] == b"\x89PNG"
        assert content[-1]["text"] in ("Does the red square fall downwards with increasing speed? Answer yes or no.",
                                       "Does the blue circle fall, hit the ground and bounce back up? Answer yes or no.")
    finally:
        srv.close()


def test_api_judge_retries_a_503_then_answers_from_text_without_logprobs():
    srv = FakeServer(fail_first=2, logprobs=False)
    try:
        judge = rewards.APIJudge(srv.url, "m", backoff=0.01)
        out = judge(torch.rand(1, 4, 3, 8, 8), ["a red square falling"])
        assert out["p_yes"].tolist() == [1.0] and len(srv.requests) == 3  # two 503s, then the answer "Yes"
    finally:
        srv.close()
    srv = FakeServer(fail_first=10)
    try:
        # the server answered (503s): its message is quoted, and it is not called unreachable (issue #31)
        with pytest.raises(RuntimeError, match="failed after 3 tries \\(HTTP 503: overloaded\\)") as e:
            rewards.APIJudge(srv.url, "m", retries=2, backoff=0.01)(torch.rand(1, 4, 3, 8, 8), ["x"])
        assert "unreachable" not in str(e.value) and len(srv.requests) == 3
    finally:
        srv.close()


def test_api_judge_fails_clearly_on_a_refused_connection(monkeypatch):
    import socket
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-print-me")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    judge = rewards.APIJudge(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff=0.01, timeout=5)
    with pytest.raises(ConnectionError, match=f"judge server http://127.0.0.1:{port}/v1/chat/completions unreachable") as e:
        judge(torch.rand(1, 4, 3, 8, 8), ["x"])
    assert "sk-never-print-me" not in str(e.value) and "vllm serve" in str(e.value)
    with pytest.raises(ValueError, match="not an http"):
        rewards.load_reward("api:m@localhost:8000")


def test_weighted_sum_of_real_rewards(more_models):
    d, _ = more_models
    both = rewards.load_reward(f"vjepa2@{d / 'jepa'}*2+videomae:juggling_balls@{d / 'mae'}*0.5")
    videos = torch.rand(2, 8, 3, 32, 32)
    out = both(videos, ["a", "b"])
    a = rewards.load_reward(f"vjepa2@{d / 'jepa'}")(videos, ["a", "b"])["reward"]
    b = rewards.load_reward(f"videomae:juggling_balls@{d / 'mae'}")(videos, ["a", "b"])["reward"]
    assert torch.allclose(out["reward"], 2 * a + 0.5 * b, atol=1e-6) and both.differentiable
    assert torch.allclose(out["vjepa2:consistency/consistency"], a)
    assert both.patch_scores(videos, ["a", "b"], (1, 1, 2)).shape == (2, 1, 1, 2)
    assert not rewards.load_reward("api:m@http://127.0.0.1:9/v1+toy:quality").differentiable
