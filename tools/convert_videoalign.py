"""Convert VideoAlign's VideoReward release into a plain Qwen2-VL folder that `--reward videoreward@<out>` loads.

    python tools/convert_videoalign.py <VideoAlign release folder> <out folder> [--base <Qwen2-VL folder>] [--step N]

The release layout is model_config.json + checkpoint-<step>/ (model.pth, or adapter_model.safetensors +
non_lora_state_dict.pth over the base Qwen2-VL that model_config.json names). The output holds the LoRA merged
into the base's layers, `rm_head.weight`, the tokenizer with the three reward tokens and the base's processor
files (rewards.convert_videoreward). Loading the release folder itself (`--reward videoreward@<release>`)
converts it once into <release>/hf-checkpoint-<step> the same way; this command does it ahead of time, or
into a folder of your choice. Prints the output folder.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert VideoAlign's VideoReward release (model_config.json + "
                                            "checkpoint-*/) into a plain Qwen2-VL folder for --reward videoreward@<out>")
    p.add_argument("release")
    p.add_argument("out")
    p.add_argument("--base", help="the base Qwen2-VL folder (default: model_config.json's model_name_or_path)")
    p.add_argument("--step", type=int, help="the checkpoint-<step> to convert (default: the latest)")
    a = p.parse_args(argv)
    print(rewards.convert_videoreward(a.release, a.out, a.base, a.step))


if __name__ == "__main__":
    main()
