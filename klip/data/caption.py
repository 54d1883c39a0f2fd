"""The caption schema: one home for what every layer knows of a caption's form.

A caption is the eight field values of a chip's family, each after its template prefix, joined
with SEPARATOR (klip/data/text.py composes and splits them); tokenized, it starts with [ENC]
and separates clauses with [SEP] (klip/data/tokenizer.py). Data, the HCoT generator, the model's
losses and predictions, SCIO and the evaluators import these names from here, downward.
"""

# The two families of structured text and their eight fields, in caption order (method.md §1).
TARGET_FIELDS = ("count", "location", "feature", "size", "category", "distribution", "region",
                 "environment")
LANDFORM_FIELDS = ("terrain", "functionality", "distribution", "layout", "boundary", "buildings",
                   "roads", "water")
FAMILIES = {"target": TARGET_FIELDS, "landform": LANDFORM_FIELDS}
CLAUSES = len(TARGET_FIELDS)  # clauses per caption, the same in every family
assert all(len(f) == CLAUSES for f in FAMILIES.values())
# The fields the pixels can show; the others (region, environment, functionality, layout,
# boundary, feature) come from lat/lon, the knowledge tables or imaging metadata.
OBSERVABLE_FIELDS = ("count", "category", "size", "location", "distribution", "terrain", "water",
                     "buildings", "roads")

SEPARATOR = " $ "
# The value of a field the generator could not resolve from a chip's data (e.g. the place of a
# chip without a location); the generator writes it, builders that withhold a field write it.
GENERIC = "not resolved from the metadata"

# Template prefix of every field; the value span follows the prefix directly.
PREFIXES = {
    # target family
    "count": "the number of targets is ",
    "location": "the targets are located at ",
    "feature": "their scattering features are ",
    "size": "their size is ",
    "category": "the targets are classified as ",
    "distribution": "the spatial distribution is ",
    "region": "the region is ",
    "environment": "the surrounding environment is ",
    # landform family ("distribution" is shared with the target family)
    "terrain": "the terrain is classified as ",
    "functionality": "the regional function is ",
    "layout": "the layout is ",
    "boundary": "the boundaries are ",
    "buildings": "the buildings are ",
    "roads": "the roads are ",
    "water": "the water bodies are ",
}

# Token ids the tokenizer reserves: 0 pad, 1 unk, then the control tokens [ENC] (first token
# of every text: pooled for contrast), [DEC] (decoder start), [MASK], [SEP] (clause separator).
PAD, UNK, ENC, DEC, MASK, SEP = 0, 1, 2, 3, 4, 5
SPECIALS = ("[ENC]", "[DEC]", "[MASK]", "[SEP]")
TEMPLATE = -1  # clause id of a token outside every value span
