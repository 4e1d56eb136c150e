"""Write a tiny example of the folder dataset that ``python -m nuwa3dna.train --data DIR`` reads.

    python scripts/make_example_dataset.py examples/shapes_folder [--images 12] [--videos 12] [--seed 0]

What it writes (the format is documented in model/datasets.py):

    DIR/captions.jsonl        {"file": "images/img_000.png", "caption": "a red circle", "sketch": "sketches/img_000.png"}
                              {"file": "videos/vid_000.gif", "caption": "a blue square moves left", "sketch": ...}
    DIR/images/*.png          64 x 48 px images (not square: training letterboxes them, with a warning)
    DIR/videos/*.gif          4-frame GIF videos, 32 x 32 px
    DIR/sketches/*.png|*.gif  class maps (greyscale class indices: 0 background, 1 circle, 2 square, 3 triangle)

The pictures come from the procedural generator (model/data.py), drawn at 48 px
inside a wider canvas for the images, so the example exercises what a user's
files bring: another size, another aspect ratio, PNG and GIF, optional sketches.
Replace them with your own files and captions.
"""
import argparse
import json
import os
import sys

import numpy as np
from PIL import Image


def write_example(out: str, images: int = 12, videos: int = 12, seed: int = 0) -> str:
    from nuwa3dna.model import data, imageio
    os.makedirs(out, exist_ok=True)
    for sub in ("images", "videos", "sketches"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    lines = []
    big = data.DataConfig(image_size=48)
    for i in range(images):
        s = data.make_sample(seed, i, big, frames=1)
        canvas = np.zeros((48, 64, 3), dtype=np.uint8)
        canvas[:, 8:56] = imageio.to_uint8(s.video[0])
        Image.fromarray(canvas).save(os.path.join(out, "images", f"img_{i:03d}.png"))
        sk = np.zeros((48, 64), dtype=np.uint8)
        sk[:, 8:56] = s.sketch[0].numpy().astype(np.uint8)
        Image.fromarray(sk, mode="L").save(os.path.join(out, "sketches", f"img_{i:03d}.png"))
        lines.append({"file": f"images/img_{i:03d}.png", "caption": s.caption,
                      "sketch": f"sketches/img_{i:03d}.png"})
    for i in range(videos):
        s = data.make_sample(seed + 1, i, data.DataConfig())
        imageio.save_gif(s.video, os.path.join(out, "videos", f"vid_{i:03d}.gif"))
        frames = [Image.fromarray(f.numpy().astype(np.uint8), mode="L") for f in s.sketch]
        frames[0].save(os.path.join(out, "sketches", f"vid_{i:03d}.gif"), save_all=True,
                       append_images=frames[1:], duration=300, loop=0)
        entry = {"file": f"videos/vid_{i:03d}.gif", "caption": s.caption}
        if i % 2 == 0:                       # sketches are optional: half the videos have one
            entry["sketch"] = f"sketches/vid_{i:03d}.gif"
        lines.append(entry)
    with open(os.path.join(out, "captions.jsonl"), "w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in lines)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.images < 0 or a.videos < 0 or a.images + a.videos == 0:
        print("error: --images and --videos must be >= 0 and not both 0", file=sys.stderr)
        return 2
    print(f"wrote {write_example(a.out, a.images, a.videos, a.seed)} ({a.images} images, {a.videos} videos)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
