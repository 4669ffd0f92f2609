"""Caption metrics through pycocoevalcap's scorers, and Shapes exact match.

BLEU-1..4, ROUGE-L and CIDEr-D (pycocoevalcap's `Cider` is the CIDEr-D variant used
on the COCO leaderboard); METEOR when Java is present. Texts are tokenized with
`clean_caption` (lower case, punctuation removed) instead of the PTB tokenizer, which
would start a Java process for every call. `COCOEvalCap.evaluate()` is never called:
it downloads SPICE's models.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence

from xmodal.data.text import clean_caption
from xmodal.worlds.shapes import SceneSpec, parse


def java_available() -> bool:
    return shutil.which("java") is not None


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]],
                   meteor: bool = True) -> dict[str, float]:
    """Corpus-level scores of candidates[i] against references[i] (a list of texts)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    res = {i: [clean_caption(c) or "<empty>"] for i, c in enumerate(candidates)}
    gts = {i: [clean_caption(r) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in gts.values()):
        raise ValueError("every candidate needs at least one reference caption")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider_d"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        if java_available():
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                scores["meteor"] = float(scorer.compute_score(gts, res)[0])
            finally:
                with scorer.lock:
                    scorer.meteor_p.stdin.close()
                    scorer.meteor_p.kill()
                    scorer.meteor_p.wait()
        else:
            warnings.warn("METEOR skipped: it needs Java (`java` is not on PATH)", stacklevel=2)
    return scores


def exact_match(candidates: Sequence[str], scenes: Sequence[SceneSpec]) -> float:
    """Share of captions that parse by the Shapes grammar and name exactly the true scene."""
    if len(candidates) != len(scenes):
        raise ValueError(f"{len(candidates)} captions but {len(scenes)} scenes")
    return sum(parse(c) == s for c, s in zip(candidates, scenes)) / max(len(scenes), 1)
