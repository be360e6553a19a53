"""Where the time goes in each algorithm's loop, and our sampler against the stock diffusers pipeline.

    python benchmarks/performance.py                      # toy model + tiny random Wan with a VAE (CPU, ~10 min)
    python benchmarks/performance.py --model wan-real --device cuda --mixed-precision bf16   # a GPU: Wan 2.1 1.3B
                                                          # architecture, random weights, 480p, 33 frames
For every (algorithm, model) one subprocess runs the script's real `main` for a few steps with timers
wrapped around common.sample / models.VideoModel.denoise / models.VideoModel.decode, the reward calls and every backward;
evaluation, model loading and checkpoint writing are excluded. Printed per run: seconds per step split
into sampling / reward / update, videos sampled per second, peak memory (CUDA: max allocated; CPU:
the process's peak RSS), and the fraction of loop time spent inside the denoiser, the decoder and
the reward (forward and backward): the rest is our overhead. Writes benchmarks/results/performance.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", nargs="*", default=["toy", "tiny-wan"], help="toy, tiny-wan (random, with a VAE), wan-real (1.3B config, random)")
p.add_argument("--algorithms", nargs="*", default=["online_vpo", "gran_dpo", "vader_grad", "vlm_feedback_rwr"], help="scripts to time")
p.add_argument("--steps", type=int, default=4, help="optimisation steps timed per run (RWR: 1 round)")
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype")
p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models on 2 shared cores)")
p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "performance.json"), help="JSON of every figure")
p.add_argument("--one", nargs=3, metavar=("ALGORITHM", "MODEL_FOLDER", "JSON_OUT"), help=argparse.SUPPRESS)  # internal


def build_models(names, folder):
    """Model folders: the shipped toy model, a tiny random Wan with a VAE, the Wan 2.1 1.3B architecture."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny_models
    out = {}
    for n in names:
        if n == "toy":
            out[n] = "toy"
        elif n == "tiny-wan":
            tiny_models.build("wan", os.path.join(folder, n))
            out[n] = os.path.join(folder, n)
        elif n == "wan-real":
            out[n] = build_wan_real(os.path.join(folder, n))
        else:
            raise SystemExit(f"unknown --model {n!r}: toy, tiny-wan, wan-real")
    return out


def build_wan_real(folder):
    """Wan 2.1 T2V 1.3B's transformer and VAE configurations with random weights, and a small random
    UMT5 (the text encoder is frozen and runs once per prompt: its size does not change the loop)."""
    import diffusers as D
    import torch
    import tiny_models
    torch.manual_seed(0)
    pipe = D.WanPipeline(
        tokenizer=tiny_models.word_tokenizer(512), text_encoder=tiny_models.t5_encoder(d_model=4096 // 8),
        transformer=D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                            in_channels=16, out_channels=16, text_dim=4096 // 8, freq_dim=256,
                                            ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                                            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        vae=D.AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
        scheduler=D.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    pipe.save_pretrained(folder)
    return folder


def video_args(model_name, algorithm):
    size = {"toy": [], "tiny-wan": ["--num-frames", "9", "--height", "16", "--width", "16", "--sample-steps", "4"],
            "wan-real": ["--num-frames", "33", "--height", "480", "--width", "832", "--sample-steps", "20"]}[model_name]
    reward = {"online_vpo": "toy:temporal", "gran_dpo": "toy:quality", "vader_grad": "toy:quality",
              "vlm_feedback_rwr": "judge"}[algorithm]
    flag = "--judge" if algorithm == "vlm_feedback_rwr" else "--reward"
    recipe = ["--recipe", "paper"] if algorithm == "online_vpo" else []  # (the figures are the paper's settings')
    return size + [flag, reward] + recipe


def run_one(algorithm, folder, json_out, args):
    """Runs inside the subprocess: the script's main with timers around the compute."""
    import torch
    import common
    import models
    import rewards
    torch.set_num_threads(args.threads)
    T = {k: 0.0 for k in ("sample", "denoise", "decode", "reward", "backward", "excluded")}
    counts = {"videos": 0}
    depth = {"excluded": 0}

    def timed(key, fn, count=None):
        def wrapper(*a, **kw):
            if depth["excluded"] or depth.get(key):  # excluded, or nested in a timer of the same kind
                return fn(*a, **kw)
            sync()
            t0 = time.perf_counter()
            depth[key] = 1
            try:
                out = fn(*a, **kw)
            finally:
                depth[key] = 0
            sync()
            T[key] += time.perf_counter() - t0
            if count:
                counts["videos"] += count(a)
            return out
        return wrapper

    def excluded(fn):
        def wrapper(*a, **kw):
            depth["excluded"] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth["excluded"] -= 1
                if not depth["excluded"]:
                    T["excluded"] += time.perf_counter() - t0
        return wrapper

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    common.sample = timed("sample", common.sample, count=lambda a: len(a[1]))
    models.VideoModel.denoise = timed("denoise", models.VideoModel.denoise)
    for cls in models.FAMILIES.values():  # (each family decodes its own way)
        if "decode" in vars(cls):
            cls.decode = timed("decode", cls.decode)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    for name in ("evaluate", "save_checkpoint", "save_video_grid"):
        setattr(common, name, excluded(getattr(common, name)))
    models.load_model = excluded(models.load_model)
    load_reward = rewards.load_reward

    def timed_reward(*a, **kw):
        r = load_reward(*a, **kw)
        cls = type(r)
        cls.__call__ = timed("reward", cls.__call__)
        if hasattr(cls, "patch_scores"):  # Gran-DPO's patch map is reward compute too
            cls.patch_scores = timed("reward", cls.patch_scores)
        return r
    rewards.load_reward = timed_reward

    import importlib
    module = importlib.import_module(algorithm)
    argv = ["--model", folder, "--device", args.device, "--mixed-precision", args.mixed_precision,
            "--out", os.path.join(os.path.dirname(json_out), "run")] + video_args(args.model_name, algorithm)
    if algorithm == "vlm_feedback_rwr":
        argv += ["--rounds", "1", "--prompts-per-round", "8", "--videos-per-prompt", "4", "--epochs", "1",
                 "--batch-size", "8", "--eval-prompts", "toy_dynamics_heldout", "--num-train-eval-prompts", "2",
                 "--eval-seeds", "1"]
        steps = 4  # 32 videos / batch 8, one epoch
    else:
        argv += ["--steps", str(args.steps), "--batch-size", "4", "--eval-every", "1000", "--save-every", "1000",
                 "--num-eval-prompts", "2"]
        steps = args.steps
        if algorithm == "vader_grad":
            argv += ["--diversity-prompts", "1", "--diversity-seeds", "2"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    module.main(module.p.parse_args(argv))
    wall = time.perf_counter() - t0 - T["excluded"]
    inside = T["denoise"] + T["decode"] + T["reward"] + T["backward"]
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = {"algorithm": algorithm, "model": args.model_name, "steps": steps, "sec_per_step": wall / steps,
           "sampling_s": T["sample"] / steps, "reward_s": T["reward"] / steps,
           "update_s": (wall - T["sample"] - T["reward"]) / steps, "videos_per_s": counts["videos"] / wall,
           "peak_mem_gb": peak, "inside_compute_frac": inside / wall, "overhead_frac": 1 - inside / wall}
    json.dump(res, open(json_out, "w"))


def sampler_vs_stock(folder, args, n=4, steps=4):
    """Videos per second of common.sample and of the stock WanPipeline on the same components and batch."""
    import diffusers
    import torch
    import common
    import models
    torch.set_num_threads(args.threads)
    model = models.load_model(folder, args.device)
    pipe = diffusers.WanPipeline.from_pretrained(folder).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red square falling"] * n
    kw = dict(num_frames=9, height=16, width=16)
    res = {}
    for name in ("ours", "stock"):
        best = float("inf")
        for _ in range(3):  # best of 3: the shared cores are noisy
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "ours":
                    model.prompt_cache.clear()  # fair: the stock pipeline encodes the prompts on every call
                    common.sample(model, prompts, list(range(n)), steps=steps, guidance=4.0, **kw)
                else:
                    pipe(prompt=prompts, negative_prompt=[""] * n, num_inference_steps=steps, guidance_scale=4.0,
                         output_type="pt", generator=[torch.Generator().manual_seed(s) for s in range(n)], **kw)
            best = min(best, time.perf_counter() - t0)
        res[f"{name}_videos_per_s"] = n / best
    res["ratio_ours_over_stock"] = res["ours_videos_per_s"] / res["stock_videos_per_s"]
    return res


def main(args):
    results = {"runs": [], "args": {k: v for k, v in vars(args).items() if k != "one"}}
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_models(args.model, tmp)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
        for name, folder in folders.items():
            for alg in args.algorithms:
                if alg == "vlm_feedback_rwr" and name != "toy":
                    continue  # the toy judge only reads toy-world videos
                out = os.path.join(tmp, f"{name}-{alg}")
                os.makedirs(out)
                cmd = [sys.executable, os.path.abspath(__file__), "--one", alg, folder, os.path.join(out, "r.json"),
                       "--device", args.device, "--mixed-precision", args.mixed_precision, "--threads",
                       str(args.threads), "--steps", str(args.steps), "--model", name]
                res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"{alg} on {name} failed:\n{res.stderr[-3000:]}")
                r = json.load(open(os.path.join(out, "r.json")))
                results["runs"].append(r)
                print(f"{alg:17s} {name:9s} {r['sec_per_step']:7.2f} s/step = sample {r['sampling_s']:6.2f} + reward "
                      f"{r['reward_s']:5.2f} + update {r['update_s']:6.2f} | {r['videos_per_s']:6.2f} videos/s | peak "
                      f"{r['peak_mem_gb']:5.2f} GB | inside denoiser/decoder/reward {100 * r['inside_compute_frac']:5.1f}%"
                      f" (overhead {100 * r['overhead_frac']:4.1f}%)", flush=True)
        if "tiny-wan" in folders:
            results["sampler_vs_stock"] = sampler_vs_stock(folders["tiny-wan"], args)
            s = results["sampler_vs_stock"]
            print(f"sampler, tiny Wan + VAE, 4 videos x 4 steps: ours {s['ours_videos_per_s']:.2f} videos/s, stock "
                  f"WanPipeline {s['stock_videos_per_s']:.2f} videos/s (ratio {s['ratio_ours_over_stock']:.2f})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    a = p.parse_args()
    if a.one:
        a.model_name = a.model[0]
        run_one(*a.one, a)
    else:
        main(a)
