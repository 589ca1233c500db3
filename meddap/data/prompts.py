"""Text prompts of MEDDAP: the paper's template, the released code's, and Table 1.

Paper (MEDDAP, arXiv 2403.16335, section 3.2 and Table 1):

    "{adj} ultrasound image of {benign|malignant|no} tumor in the breast"

with one of ten adjectives ("none" means no leading word). The class `normal`
is phrased "no tumor".

The authors' released code differs (see ../shared/reference/paper_facts.md,
"Prompts and generation"):

- training (train_text_to_image_lora.py): "an ultrasound photo of {class_name}
  tumor in breast", where the substitution normal -> "no" is overwritten, so
  normal images are captioned "normal tumor";
- generation (Inference_percent_breast.py): the adjective is glued to the
  prompt with no space, "colorfulan ultrasound photo of no tumor in breast".

Both released forms are bugs. They are reproduced only when asked for with
`as_released=True` (`--as-released` on the command line), so that a user can
match the published adapter exactly; the default is the paper's wording with
adjectives joined by a single space.
"""
from __future__ import annotations

from enum import Enum

from meddap.errors import MeddapError

# MEDDAP Table 1, in the paper's order; "none" is the plain prompt.
ADJECTIVES: tuple[str, ...] = (
    "none", "colorful", "stylized", "high-contrast", "low-contrast",
    "posterized", "sheared", "solarized", "bright", "dark",
)
NO_ADJECTIVE = "none"

# MEDDAP section 3.2: "benign/malignant/no tumor"; normal breasts have no tumor.
CLASS_PHRASES: dict[str, str] = {"benign": "benign", "malignant": "malignant", "normal": "no"}

PAPER_TEMPLATE = "ultrasound image of {phrase} tumor in the breast"
RELEASED_TEMPLATE = "an ultrasound photo of {phrase} tumor in breast"


class Stage(Enum):
    """Which prompt the released code used: captions for LoRA training, or
    prompts for generation. The paper uses one template for both."""
    GENERATE = "generate"
    TRAIN = "train"


def class_phrase(class_name: str) -> str:
    """The word before "tumor": benign -> benign, malignant -> malignant,
    normal -> no. Other class names (a plain ImageFolder) are used as they are."""
    return CLASS_PHRASES.get(class_name, class_name)


def _adjective_word(adjective: str | None) -> str:
    """'' for no adjective (None, '' or 'none'), else the adjective with its
    whitespace collapsed to single spaces."""
    if adjective is None:
        return ""
    word = " ".join(adjective.split())
    return "" if word.lower() == NO_ADJECTIVE else word


def prompt_for(class_name: str, adjective: str | None = None, *, as_released: bool = False,
               stage: Stage | str = Stage.GENERATE) -> str:
    """The prompt for one class and adjective.

    Paper (default), any stage:
        prompt_for("normal", "colorful") == "colorful ultrasound image of no tumor in the breast"
        prompt_for("benign")             == "ultrasound image of benign tumor in the breast"
    Released code, a bug reproduction (`as_released=True`):
        stage "train":    "an ultrasound photo of normal tumor in breast" (class name verbatim,
                          no adjective: the released training captions had none);
        stage "generate": "colorfulan ultrasound photo of no tumor in breast" (adjective glued).
    """
    try:
        stage = Stage(stage)
    except ValueError:
        raise MeddapError(f"prompt stage {stage!r} is unknown; use 'generate' or 'train'.") from None
    adj = _adjective_word(adjective)
    if not as_released:
        body = PAPER_TEMPLATE.format(phrase=class_phrase(class_name))
        return f"{adj} {body}" if adj else body
    if stage is Stage.TRAIN:
        if adj:
            raise MeddapError(f"the released training captions have no adjective; got {adjective!r}. "
                              f"Use adjective=None (or 'none') with as_released=True, stage='train'.")
        # Note: released train_text_to_image_lora.py writes the class folder name, so
        # normal images say "normal tumor" (its normal -> "no" mapping is overwritten).
        return RELEASED_TEMPLATE.format(phrase=class_name)
    # Note: released Inference_percent_breast.py concatenates the adjective with no
    # space ("colorfulan ..."); the paper and our default insert one.
    return adj + RELEASED_TEMPLATE.format(phrase=class_phrase(class_name))


def unknown_adjectives(adjectives: list[str]) -> list[str]:
    """The adjectives of `adjectives` that are not in Table 1 (case-insensitive).
    Callers warn rather than fail: users may try their own words."""
    known = {a.lower() for a in ADJECTIVES}
    return [a for a in adjectives if a.strip().lower() not in known]
