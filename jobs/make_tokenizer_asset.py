"""Train the small SentencePiece model shipped as `cogview_ray/assets/tokenizer/spiece.model`.

Random-weight checkpoints need a real T5-style tokenizer, and the Hub one cannot be downloaded
in tests, so we train a tiny unigram model on a corpus written for this project (below). Run once:

    python jobs/make_tokenizer_asset.py [--out cogview_ray/assets/tokenizer/spiece.model]

Ids follow T5: pad 0, eos 1, unk 2, no bos. The T5 tokenizer adds its 100 extra ids on top.
"""
from __future__ import annotations

import argparse
import io
import itertools
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 512

# Hand-written sentences in the style of image prompts and captions.
SENTENCES = """
A red fox sleeping in the snow under a pine tree at dawn.
An old lighthouse on a rocky cliff, waves crashing below, dramatic storm clouds.
A bowl of ramen with a soft boiled egg, steam rising, studio lighting.
Portrait of an elderly fisherman with a white beard, wearing a yellow raincoat.
A futuristic city at night with neon signs reflected in wet streets.
Watercolor painting of a quiet harbour with small wooden boats.
A cat wearing tiny glasses, reading a newspaper at a breakfast table.
Aerial photograph of green rice terraces in the morning mist.
A medieval castle on a hill, surrounded by autumn forests and a winding river.
Close-up of a honeybee collecting pollen from a purple flower, macro photography.
A cozy library with tall shelves, a fireplace and a leather armchair.
An astronaut riding a horse across a desert on Mars, cinematic, wide angle.
A vintage bicycle leaning against a blue door in a narrow Italian street.
Oil painting of sunflowers in a clay vase on a wooden table.
A snowy mountain village with warm lights in the windows at dusk.
Two children flying a kite on a windy beach, golden hour.
A steaming cup of coffee next to an open notebook and a fountain pen.
Isometric illustration of a tiny island with a windmill and sheep.
A giant whale swimming through clouds above a sleeping town.
Black and white photograph of a jazz musician playing the saxophone.
A robot gardener watering tomatoes in a greenhouse, soft morning light.
Pixel art of a knight standing in front of a dragon's cave.
A bustling market with baskets of oranges, lemons, spices and fresh bread.
Underwater scene with coral reefs, sea turtles and schools of silver fish.
A minimalist poster of a mountain range with the text "hello world".
A dog shaking water off its fur in slow motion, droplets everywhere.
The interior of a train carriage at sunset, passengers reading, film grain.
A paper boat floating down a rain gutter, shallow depth of field.
A glass greenhouse full of orchids and ferns, humid atmosphere.
An ancient temple overgrown by jungle vines, rays of light through the canopy.
Photo of a chocolate cake with strawberries on top, 85mm lens, f/1.8.
A family of ducks crossing a country road while cars wait patiently.
A wizard's desk with potions, maps, candles and a sleeping owl.
Street photography of Tokyo in the rain, people with transparent umbrellas.
A hot air balloon festival over a valley, dozens of colourful balloons.
Low poly 3D render of a fox in a forest clearing.
A lone tree in a field of lavender under a starry sky, long exposure.
A chef tossing vegetables in a flaming wok, motion blur, high contrast.
Children's book illustration of a bear and a rabbit having a picnic.
A stone bridge over a waterfall in a misty forest, highly detailed, 4k.
""".strip().splitlines()

SUBJECTS = [
    "a small dog", "an old man", "a young woman", "a white horse", "a green parrot",
    "a sailing ship", "a wooden cabin", "a glass bottle", "a blue car", "a tall giraffe",
    "a tiny mouse", "a brave knight", "a sleepy owl", "a golden retriever", "a black cat",
    "a steam train", "a pink flamingo", "a lonely robot", "a group of friends", "a busy chef",
]
ACTIONS = [
    "standing", "running", "sitting", "dancing", "reading a book", "looking at the sea",
    "walking through a park", "resting", "jumping over a fence", "drinking tea",
    "painting a picture", "playing the guitar", "waiting for the bus", "smiling",
]
PLACES = [
    "in a sunny meadow", "on a crowded street", "inside a dark cave", "near a frozen lake",
    "on the roof of a building", "in a quiet kitchen", "under a bright full moon",
    "beside a mountain stream", "in a colourful garden", "at the edge of a forest",
    "on a sandy beach", "in a snowy city square", "inside a museum", "on a rainy evening",
]
STYLES = [
    "photorealistic", "oil painting", "watercolor", "digital art", "pencil sketch",
    "studio photo", "cinematic lighting", "soft pastel colours", "high resolution",
    "ultra detailed", "anime style", "vintage film photo", "dramatic shadows", "concept art",
]

# Extra everyday vocabulary, so the model learns whole words beyond the templates above.
WORDS = """
apple banana cherry grape melon peach pear plum carrot potato onion garlic pepper cheese bread
butter honey sugar salt soup salad pasta pizza sandwich burger noodles rice sushi dumpling cookie
morning afternoon evening midnight spring summer autumn winter sunrise sunset twilight rainbow
thunder lightning fog mist snowflake breeze hurricane desert canyon volcano glacier island valley
river ocean harbour bridge tower castle palace cottage barn factory station airport library school
hospital church temple market garden orchard vineyard farm village city town street alley road
highway tunnel subway balcony window curtain mirror lamp candle clock table chair sofa bed pillow
blanket carpet staircase kitchen bathroom attic basement doorway fence gate wall roof chimney
elephant tiger lion zebra monkey panda koala kangaroo penguin dolphin shark octopus jellyfish
butterfly dragonfly spider beetle snail frog turtle lizard snake eagle hawk sparrow swan peacock
rabbit squirrel hedgehog deer wolf bear moose camel donkey goat sheep cow pig chicken
violin piano trumpet drum flute harp guitar camera telescope umbrella backpack suitcase lantern
hat scarf gloves boots jacket dress shirt sweater necklace ring crown helmet armour sword shield
mountain forest jungle meadow prairie swamp marsh lagoon waterfall cliff cave beach dune reef
bright dark shiny glowing ancient modern rustic elegant gloomy cheerful peaceful mysterious
enormous miniature fluffy smooth rough wet dry frozen burning floating flying broken hidden
red orange yellow green blue purple pink brown grey gray white black silver golden turquoise
happy sad angry calm curious tired excited proud lonely friendly playful serious thoughtful
sharp focus bokeh lens aperture exposure composition symmetry perspective silhouette texture
sculpture mosaic tapestry engraving charcoal gouache acrylic collage origami ceramic porcelain
""".split()


def build_corpus() -> list[str]:
    """The hand-written sentences plus deterministic combinations of the word lists."""
    lines = list(SENTENCES)
    combos = itertools.product(SUBJECTS, ACTIONS, PLACES, STYLES)
    # Every 7th combination keeps the corpus small (a few thousand lines) but covers all words.
    for i, (subject, action, place, style) in enumerate(combos):
        if i % 7 == 0:
            lines.append(f"{subject.capitalize()} {action} {place}, {style}.")
    # Each word alone and in small phrases, in a fixed order.
    for i, word in enumerate(WORDS):
        neighbour = WORDS[(i * 37) % len(WORDS)]
        lines.append(f"The {word} and the {neighbour}.")
        lines.append(f"{word.capitalize()}, {neighbour}s and more {word}s.")
    return lines


def train(out_path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(build_corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        num_threads=1,
        minloglevel=2,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    print(f"wrote {out_path} ({len(model.getvalue())} bytes, vocab {vocab_size})")


def asset_main(doc: str, asset: str, vocab_size: int, train_fn) -> None:
    """The command line of an asset script: `--out` (default: the asset's place in the package)
    and `--vocab-size`, then `train_fn(out, vocab_size)`."""
    default = Path(__file__).resolve().parents[1] / "cogview_ray/assets" / asset
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default)
    parser.add_argument("--vocab-size", type=int, default=vocab_size)
    args = parser.parse_args()
    train_fn(args.out, args.vocab_size)


def main() -> None:
    asset_main(__doc__, "tokenizer/spiece.model", VOCAB_SIZE, train)


if __name__ == "__main__":
    main()
