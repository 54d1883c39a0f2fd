"""klip/data/content.py: what a caption value says that the pixels can show."""

from klip.data import caption as caption_lib
from klip.data import content as content_lib


def test_normalize_lower_cases_and_drops_punctuation():
  assert content_lib.normalize("The Ships, 3.5 m $ (60 %)!") == "the ships 3 5 m 60"


def test_content_reads_what_a_value_says_whatever_its_wording():
  """The rules generator words the same chip differently under another chip id (its random
  choices are seeded by the id): every observable field's `content` stays the same, the count's
  is the chip's number of targets, while the exact text differs for some fields."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from klip.data import simulator  # pylint: disable=g-import-not-at-top
  from klip.hcot import generator  # pylint: disable=g-import-not-at-top
  gen = generator.Generator(generator.make_backend("rules"))
  reworded = set()
  for i in range(40):
    chip = simulator.simulate_chip(i, 7, size=64)
    wordings = [gen.generate(dataclasses.replace(chip, id=f"{chip.id}/{k}")).text.values
                for k in range(4)]
    for f, name in enumerate(chip.field_names):
      if name not in caption_lib.OBSERVABLE_FIELDS:
        continue
      keys = {content_lib.content(name, w[f]) for w in wordings}
      assert len(keys) == 1, (name, [w[f] for w in wordings])
      if len({w[f] for w in wordings}) > 1:
        reworded.add(name)
    if chip.family == "target":
      assert content_lib.content("count", wordings[0][0]) == str(chip.count)
  assert {"count", "terrain"} <= reworded
  # different facts read differently
  assert content_lib.content("count", "three ships") != content_lib.content("count", "4 ships")
  assert content_lib.content("location", "the top and left of the image") == \
      content_lib.content("location", "the left and top of the image") != \
      content_lib.content("location", "the top of the image")
  assert content_lib.content("water", "a dark water body covering about 27 % of the image, "
                            "specular at 37.9° incidence") == "a dark water body" != \
      content_lib.content("water", "absent")
  assert content_lib.content("terrain", "built-up area on the plateau of Kunming, China") == \
      content_lib.content("terrain", "built-up area within the delta of Ulsan, South Korea") != \
      content_lib.content("terrain", "vegetated land in the delta of Ulsan, South Korea")
  assert content_lib.content("size", "about 35 m long, 7 pixels at 5 m per pixel") == \
      content_lib.content("size", "35 m long, spanning 7 pixels at 5 m per pixel")
