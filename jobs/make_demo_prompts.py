"""Write configs/demo_prompts.parquet, the demo's bundled prompts (deterministic: rerunning it
rewrites the same rows). Rows without height/width take the render defaults of the demo config."""
from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent.parent / "configs" / "demo_prompts.parquet"

PROMPTS = [
    "a red fox curled up asleep in fresh snow at dawn",
    "a lighthouse on a rocky island under a violet evening sky",
    "a bowl of ramen with a soft egg, steam rising, top-down photo",
    "an old wooden sailboat drifting on a glassy mountain lake",
    "a city street at night after rain, neon signs reflected in puddles",
    "a watercolor painting of cherry blossoms along a quiet canal",
    "a tabby cat wearing tiny round glasses, reading a newspaper",
    "a desert canyon with layered orange rock and a single green shrub",
    "a cozy library with tall shelves, a ladder and warm lamplight",
    "a hot air balloon festival seen from above, dozens of colors",
    "a macro photo of dew drops on a spider web",
    "a vintage bicycle leaning against a yellow stucco wall",
    "a snowy pine forest under the green glow of an aurora",
    "a clay pot full of herbs on a sunny kitchen windowsill",
    "an astronaut planting a sunflower on a grey lunar plain",
    "a busy open-air market with baskets of oranges and lemons",
    "a paper origami crane on a desk beside a cup of tea",
    "a thunderstorm over a wheat field, one lightning bolt",
    "a pixel-art castle on a floating island with waterfalls",
    "a close-up portrait of an elderly fisherman with a knitted cap",
    "a child's drawing of a house, a sun and three tall trees",
    "a glass terrarium with moss, ferns and a tiny stone path",
    "a steam locomotive crossing a stone viaduct in autumn",
    "a coral reef with a sea turtle swimming past striped fish",
    "a minimalist poster of a mountain, two colors, flat shapes",
    "a stack of pancakes with blueberries and maple syrup",
    "a foggy harbor at sunrise with fishing boats tied up",
    "an owl perched on a mossy branch, wide amber eyes",
    "a café terrace in the evening, strings of warm lights",
    "a robot watering plants in a rooftop garden",
    "a field of lavender rows stretching to the horizon",
    "a chessboard mid-game, dramatic side lighting",
    "an ice cave with deep blue walls and a lone explorer",
    "a tiny cottage inside a snow globe on a windowsill",
    "a koi pond from above with lily pads and orange fish",
    "a stained glass window of a phoenix, sunlight shining through",
]

# (height, width) for some rows; None means the render default (128x128 in configs/demo.yaml).
SIZES = [None, None, (128, 192), None, (256, 128), None]


def build_table() -> pa.Table:
    heights, widths = [], []
    for i in range(len(PROMPTS)):
        size = SIZES[i % len(SIZES)]
        heights.append(None if size is None else size[0])
        widths.append(None if size is None else size[1])
    return pa.table({
        "id": pa.array([f"demo-{i:03d}" for i in range(len(PROMPTS))], pa.string()),
        "prompt": pa.array(PROMPTS, pa.string()),
        "height": pa.array(heights, pa.int32()),
        "width": pa.array(widths, pa.int32()),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(build_table(), args.out, compression="zstd", row_group_size=1024)
    print(f"wrote {len(PROMPTS)} prompts to {args.out}")


if __name__ == "__main__":
    main()
