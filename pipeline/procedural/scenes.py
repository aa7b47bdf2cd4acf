"""The caption language of the procedural videos: vocabulary, grammar, parser, and scene sampling.

A shot is one or two subjects (shape, colour, motion) on a plain background. Its caption comes from
one fixed grammar:

    a <colour> <shape> <motion> [and a <colour> <shape> <motion>] on a <colour> background

e.g. "a red circle moves right and a white square stays still on a blue background". The first
subject of every shot of a video is the same one (the recurring subject: same shape and colour);
a cut changes the background, the motion or both; a second subject appears in some shots.

Colours are the eight corners of the RGB cube (every pair differs by 255 in at least one channel),
so a tiny model can learn them and a nearest-colour rule can read them back after lossy encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "bounces", "stays still", "grows", "shrinks")
MAX_SUBJECTS = 2

# Accepted variants of a motion phrase (the demo config's wording), each mapped to the canonical one.
_MOTION_VARIANTS = {
    "moves to the left": "moves left",
    "moves to the right": "moves right",
    "bounces up and down": "bounces",
    "stays": "stays still",
    "is still": "stays still",
}


class CaptionError(ValueError):
    """A caption outside the grammar; str() is one line quoting the caption."""


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    motion: str

    @property
    def identity(self) -> tuple[str, str]:
        """What must stay the same when the subject recurs in another shot."""
        return self.colour, self.shape

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {self.motion}"


@dataclass(frozen=True)
class ShotSpec:
    """What one shot shows: 1..MAX_SUBJECTS subjects of distinct colours on a background colour."""

    subjects: tuple[Subject, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.subjects) <= MAX_SUBJECTS:
            raise CaptionError(f"a shot has 1 to {MAX_SUBJECTS} subjects, got {len(self.subjects)}")
        for s in self.subjects:
            for value, allowed, what in ((s.shape, SHAPES, "shape"), (s.colour, COLOUR_NAMES, "colour"),
                                         (s.motion, MOTIONS, "motion")):
                if value not in allowed:
                    raise CaptionError(f"unknown {what} {value!r} (known: {', '.join(allowed)})")
        if self.background not in COLOURS:
            raise CaptionError(f"unknown background colour {self.background!r} (known: {', '.join(COLOUR_NAMES)})")
        colours = [s.colour for s in self.subjects] + [self.background]
        if len(set(colours)) != len(colours):
            raise CaptionError(f"subjects and background need distinct colours, got {', '.join(colours)}")

    @property
    def caption(self) -> str:
        return format_caption(self)


# ---------------------------------------------------------------------------------------------
# 1. Caption <-> ShotSpec
# ---------------------------------------------------------------------------------------------


def format_caption(spec: ShotSpec) -> str:
    """The canonical caption of `spec` (parse_caption's inverse)."""
    return " and ".join(s.phrase() for s in spec.subjects) + f" on a {spec.background} background"


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SUBJECT = (rf"(?:a|an|the) (?P<colour{{i}}>{_alternation(COLOUR_NAMES)}) (?P<shape{{i}}>{_alternation(SHAPES)}) "
            rf"(?P<motion{{i}}>{_alternation([*MOTIONS, *_MOTION_VARIANTS])})")
_CAPTION = re.compile(
    _SUBJECT.format(i=0) + rf"(?: and {_SUBJECT.format(i=1)})?"
    + rf" (?:on|over) (?:a|an|the) (?P<background>{_alternation(COLOUR_NAMES)}) background"
)
GRAMMAR = "a <colour> <shape> <motion> [and a <colour> <shape> <motion>] on a <colour> background"


def parse_caption(caption: str) -> ShotSpec:
    """Caption -> ShotSpec. Case, extra spaces, a final period, 'the'/'over' and the demo's motion
    wordings ("moves to the right", "bounces up and down") are accepted; anything else raises."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _CAPTION.fullmatch(text)
    if m is None:
        raise CaptionError(f"caption {caption!r} does not follow the grammar: {GRAMMAR}")
    subjects = []
    for i in range(MAX_SUBJECTS):
        if m.group(f"shape{i}"):
            motion = m.group(f"motion{i}")
            subjects.append(Subject(m.group(f"shape{i}"), m.group(f"colour{i}"), _MOTION_VARIANTS.get(motion, motion)))
    try:
        return ShotSpec(tuple(subjects), m.group("background"))
    except CaptionError as e:
        raise CaptionError(f"caption {caption!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# 2. Attribute ids: a caption as a fixed-length row of integers (training-time conditioning)
# ---------------------------------------------------------------------------------------------
# Slots: background, then (shape, colour, motion) per subject. All slots share one id space so a
# single embedding table serves them; id 0 means "no such subject".

_SLOT_VOCABS = (COLOUR_NAMES,) + (SHAPES, COLOUR_NAMES, MOTIONS) * MAX_SUBJECTS
_SLOT_OFFSETS = tuple(int(x) for x in np.cumsum([1] + [len(v) for v in _SLOT_VOCABS[:-1]]))
NUM_ATTRIBUTE_SLOTS = len(_SLOT_VOCABS)  # 7
NUM_ATTRIBUTE_IDS = 1 + sum(len(v) for v in _SLOT_VOCABS)  # embedding table size, 0 included


def attribute_ids(spec: ShotSpec) -> np.ndarray:
    """(NUM_ATTRIBUTE_SLOTS,) int64 ids of `spec` in one shared id space; 0 marks an absent subject."""
    values = [spec.background]
    for i in range(MAX_SUBJECTS):
        s = spec.subjects[i] if i < len(spec.subjects) else None
        values += [s.shape, s.colour, s.motion] if s else [None] * 3
    return np.array([0 if v is None else off + vocab.index(v)
                     for v, off, vocab in zip(values, _SLOT_OFFSETS, _SLOT_VOCABS)], dtype=np.int64)


def spec_from_ids(ids: np.ndarray) -> ShotSpec:
    """attribute_ids' inverse."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if len(ids) != NUM_ATTRIBUTE_SLOTS:
        raise CaptionError(f"expected {NUM_ATTRIBUTE_SLOTS} attribute ids, got {len(ids)}")
    values = []
    for i, off, vocab in zip(ids, _SLOT_OFFSETS, _SLOT_VOCABS):
        if i != 0 and not off <= i < off + len(vocab):
            raise CaptionError(f"attribute id {i} is out of range for its slot ({off}..{off + len(vocab) - 1})")
        values.append(vocab[i - off] if i else None)
    subjects = tuple(Subject(*values[1 + 3 * k: 4 + 3 * k]) for k in range(MAX_SUBJECTS) if values[1 + 3 * k])
    return ShotSpec(subjects, values[0])


# ---------------------------------------------------------------------------------------------
# 3. Sampling a multi-shot script
# ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    choices = [o for o in options if o not in exclude]
    return choices[int(rng.integers(len(choices)))]


def sample_script(rng: np.random.Generator, num_shots: int, second_subject_prob: float = 0.3) -> list[ShotSpec]:
    """A video's shots: one recurring subject in every shot; each cut changes the background, the
    motion, or both; an optional second subject (one identity per video) joins some shots."""
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1, got {num_shots}")
    main = (_pick(rng, SHAPES), _pick(rng, COLOUR_NAMES))
    other = (_pick(rng, SHAPES), _pick(rng, COLOUR_NAMES, exclude=(main[1],)))
    shots: list[ShotSpec] = []
    for i in range(num_shots):
        with_other = bool(rng.random() < second_subject_prob)
        taken = (main[1], other[1]) if with_other else (main[1],)
        if i == 0:
            background, motion = _pick(rng, COLOUR_NAMES, exclude=taken), _pick(rng, MOTIONS)
        else:
            prev = shots[-1]
            change = _pick(rng, ("background", "motion", "both"))
            new_bg = change != "motion" or prev.background in taken
            background = _pick(rng, COLOUR_NAMES, exclude=(*taken, prev.background)) if new_bg else prev.background
            prev_motion = prev.subjects[0].motion
            motion = _pick(rng, MOTIONS, exclude=(prev_motion,)) if change != "background" else prev_motion
        subjects = [Subject(main[0], main[1], motion)]
        if with_other:
            subjects.append(Subject(other[0], other[1], _pick(rng, MOTIONS)))
        shots.append(ShotSpec(tuple(subjects), background))
    return shots
