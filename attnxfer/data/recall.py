"""Visual associative recall: a labelled image task that only attention across the whole image solves.

A grid of glyph cells, mostly blank: ``pairs`` cells hold a key→value glyph, one cell a query (a key's code
beside a fixed marker); the label is the value paired with the query's key (docs/data.md). Keys and values
in an image are distinct, so reading values without matching keys is worth 1/``pairs``; query and pair are
at least ``distance`` cells apart, so no ``distance`` x ``distance`` window holds both. With ``hops`` > 1
each pair becomes a chain: key→key links, then key→value, so the query's key leads to the label in
``hops`` look-ups that no single attention layer can make at once. Everything is a function of the seed:
sample i of (seed, split, epoch, i), made on access; train samples are new each epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from ..errors import InputError
from .identity import fingerprint_of
from .registry import DatasetInfo, built_info, register_dataset
from .seeding import key_epoch, sample_generator

RECALL_INFO = DatasetInfo(
    name="recall", num_classes=10, class_names=None, mean=(0.5,), std=(0.5,), in_chans=3, img_size=64
)

_SPLIT_IDS = {"train": 0, "val": 1}
_BACKGROUND = 0.5  # blank pixels; code bits are 0 or 1, so (x - 0.5) / 0.5 is 0 or +-1


@dataclass(frozen=True)
class RecallLayout:
    """Where every glyph of one sample is and what it says (cells are (row, col) in the glyph grid)."""

    img_size: int
    query_cell: tuple[int, int]
    query_key: int
    pair_cells: tuple[tuple[int, int], ...]
    pair_keys: tuple[int, ...]
    pair_values: tuple[int, ...]
    distractor_cells: tuple[tuple[int, int], ...]
    distractor_seed: int
    link_cells: tuple[tuple[int, int], ...] = ()  # key→key glyphs, the chains' first hops (``hops`` > 1)
    link_keys: tuple[tuple[int, int], ...] = ()  # (from, to) of each link cell

    def chain(self) -> list[tuple[int, int]]:
        """The cells the answer is read through, from the query's key to its value."""
        links = {a: (cell, b) for cell, (a, b) in zip(self.link_cells, self.link_keys)}
        cells, key = [], self.query_key
        while key in links:
            cell, key = links[key]
            cells.append(cell)
        return [*cells, self.pair_cells[self.pair_keys.index(key)]]

    @property
    def label(self) -> int:
        """The value at the end of the query key's chain (for one hop: the value whose key is the query's)."""
        return self.pair_values[self.pair_cells.index(self.chain()[-1])]

    @property
    def match_cell(self) -> tuple[int, int]:
        """The cell holding the query's key (its pair, or its chain's first link)."""
        return self.chain()[0]


def _distinct_codes(count: int, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """``count`` distinct random 0/1 patterns of ``shape`` (the caller checks that there are enough)."""
    bits = math.prod(shape)
    codes: list[torch.Tensor] = []
    seen: set[bytes] = set()
    while len(codes) < count:
        code = torch.randint(0, 2, shape, generator=g, dtype=torch.uint8)
        tag = code.numpy().tobytes()
        if tag not in seen and 0 < int(code.sum()) < bits:  # never all-blank-looking (all 0 or all 1)
            seen.add(tag)
            codes.append(code)
    return torch.stack(codes).float()


@dataclass(frozen=True)
class RecallStage:
    """The knobs of one stage of the task (the whole task, without a curriculum)."""

    img_size: int
    pairs: int
    num_keys: int
    distractors: int
    distance: int
    # out of the repr, which the fingerprint hashes, so one-hop data keeps the identity it had before hops
    hops: int = field(default=1, repr=False)


class _Grid:
    """A stage's glyph grid: its cells and the cells a query may sit in (some cell is ``distance`` away)."""

    def __init__(self, img_size: int, glyph: int, distance: int):
        self.size = img_size // glyph
        rows, cols = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        self.cells = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (G*G, 2)
        edge = torch.stack([self.cells, self.size - 1 - self.cells], dim=1).flatten(1).amax(dim=1)
        self.query_cells = (edge >= distance).nonzero().flatten()
        self.tuples = [tuple(c) for c in self.cells.tolist()]


class RecallImages(Dataset):
    """``length`` samples (x, label): x is (in_chans, img_size, img_size) normalised by mean/std.

    ``curriculum``: (last epoch, stage) pairs the train split walks through before ``stage`` (the task's own
    knobs, which val always has); glyph, classes and channels stay, so one model sees every stage."""

    def __init__(
        self,
        info: DatasetInfo,
        *,
        split: str,
        length: int,
        seed: int,
        glyph: int,
        stage: RecallStage,
        curriculum: Sequence[tuple[int, RecallStage]] = (),
    ):
        self.info = info
        self.length = length
        self.seed = seed
        self.glyph = glyph
        self.stage = stage
        self.distance = stage.distance
        self._split_id = _SPLIT_IDS[split]
        self.curriculum = tuple(curriculum) if self._split_id == 0 else ()
        self._grids = {
            st: _Grid(st.img_size, glyph, st.distance) for st in {stage, *(s for _, s in self.curriculum)}
        }
        self.grid = self._grids[stage].size
        half = (info.in_chans, glyph, glyph // 2)
        g = sample_generator(seed, -1, -1)  # the codes: shared by both splits and every stage
        most_keys = max(st.num_keys for st in self._grids)
        # values, the marker, then keys: key i's code is the same for any count
        codes = _distinct_codes(info.num_classes + 1 + most_keys, half, g)
        self.value_codes = codes[: info.num_classes]  # (num_classes, C, glyph, glyph/2) of 0/1
        self.marker = codes[info.num_classes]
        self.key_codes = codes[info.num_classes + 1 :]
        tags = [code.to(torch.uint8).numpy().tobytes() for code in codes]
        self._left_codes = set(tags[info.num_classes + 1 :])  # what a distractor's halves must not be
        self._right_codes = set(tags[: info.num_classes + 1])
        if max(st.hops for st in self._grids) > 1:  # a link's right half is a key
            self._right_codes |= self._left_codes
        self._mean = torch.tensor(info.mean).view(-1, 1, 1)
        self._std = torch.tensor(info.std).view(-1, 1, 1)

    @property
    def sizes(self) -> list[int]:
        """The image sides its curriculum's stages yield besides the task's own (a model must run at each)."""
        return sorted({st.img_size for _, st in self.curriculum} - {self.stage.img_size})

    def stage_of(self, epoch: int) -> RecallStage:
        """The stage a train epoch draws from (val: always the task's own)."""
        for last, st in self.curriculum:
            if epoch <= last:
                return st
        return self.stage

    def __len__(self) -> int:
        return self.length

    def fingerprint(self) -> str:
        """What defines its samples (`attnxfer.data.identity`): they are generated from these alone."""
        i = self.info
        hops = [self.stage.hops, *(st.hops for _, st in self.curriculum)]
        return fingerprint_of(
            [
                "recall",
                self.seed,
                self.length,
                self._split_id,
                i.num_classes,
                i.in_chans,
                i.img_size,
                self.glyph,
                self.stage,
                self.curriculum,
                *([("hops", hops)] if max(hops) > 1 else []),  # one-hop data: the identity it had before
            ]
        )

    def layout(self, index: int) -> RecallLayout:
        """Sample ``index``'s glyphs (a train index that carries an epoch, `SampleKey`, gets that epoch's)."""
        idx = int(index)
        if not 0 <= idx < self.length:
            raise IndexError(f"index {idx} out of range for {self.length} samples")
        epoch = key_epoch(index, 0) if self._split_id == 0 else 0
        st = self.stage_of(epoch)
        grid = self._grids[st]
        g = sample_generator(self.seed, (self._split_id << 32) + epoch, idx)
        q = grid.query_cells[torch.randint(len(grid.query_cells), (1,), generator=g)].item()
        chain: list[int] = []  # the queried chain's cells, each `distance` from the one before
        for _ in range(st.hops):
            prev = grid.cells[chain[-1] if chain else q]
            far = (grid.cells - prev).abs().amax(dim=1) >= st.distance
            far[[q, *chain]] = False
            far = far.nonzero().flatten()
            chain.append(far[torch.randint(len(far), (1,), generator=g)].item())
        free = torch.ones(len(grid.cells), dtype=torch.bool)
        free[[q, *chain]] = False
        rest = free.nonzero().flatten()
        n_other = (st.pairs - 1) * st.hops
        rest = rest[torch.randperm(len(rest), generator=g)[: n_other + st.distractors]].tolist()
        keys = torch.randperm(st.num_keys, generator=g)[: st.pairs * st.hops].tolist()
        values = torch.randperm(self.info.num_classes, generator=g)[: st.pairs].tolist()
        which = torch.randint(st.pairs, (1,), generator=g).item()  # which chain the query asks for
        others = iter(rest[:n_other])
        chains = [chain if c == which else [next(others) for _ in range(st.hops)] for c in range(st.pairs)]
        cell = grid.tuples
        h = st.hops
        return RecallLayout(
            img_size=st.img_size,
            query_cell=cell[q],
            query_key=keys[which * h],
            pair_cells=tuple(cell[ch[-1]] for ch in chains),
            pair_keys=tuple(keys[c * h + h - 1] for c in range(st.pairs)),
            pair_values=tuple(values),
            distractor_cells=tuple(cell[i] for i in rest[n_other:]),
            distractor_seed=int(torch.randint(2**62, (1,), generator=g).item()),
            link_cells=tuple(cell[ch[j]] for ch in chains for j in range(h - 1)),
            link_keys=tuple(
                (keys[c * h + j], keys[c * h + j + 1]) for c in range(st.pairs) for j in range(h - 1)
            ),
        )

    def render(self, layout: RecallLayout) -> torch.Tensor:
        """The normalised image of ``layout`` (any layout: tests build counterfactuals with it)."""
        c, gl, s = self.info.in_chans, self.glyph, layout.img_size
        half = gl // 2
        pixels = torch.full((c, s, s), _BACKGROUND)

        def put(cell: tuple[int, int], left: torch.Tensor, right: torch.Tensor) -> None:
            r, col = cell[0] * gl, cell[1] * gl
            pixels[:, r : r + gl, col : col + half] = left
            pixels[:, r : r + gl, col + half : col + 2 * half] = right

        put(layout.query_cell, self.key_codes[layout.query_key], self.marker)
        for cell, (a, b) in zip(layout.link_cells, layout.link_keys, strict=True):
            put(cell, self.key_codes[a], self.key_codes[b])
        for cell, k, v in zip(layout.pair_cells, layout.pair_keys, layout.pair_values, strict=True):
            put(cell, self.key_codes[k], self.value_codes[v])
        if layout.distractor_cells:
            g = torch.Generator().manual_seed(layout.distractor_seed)
            for cell in layout.distractor_cells:
                put(cell, self._noise(g, self._left_codes), self._noise(g, self._right_codes))
        return (pixels - self._mean) / self._std

    def _noise(self, g: torch.Generator, codes: set[bytes]) -> torch.Tensor:
        """A random half glyph that is none of ``codes`` (a distractor never reads as a key, value or query)."""
        while True:
            bits = torch.randint(0, 2, self.marker.shape, generator=g, dtype=torch.uint8)
            if bits.numpy().tobytes() not in codes:
                return bits.float()

    def image(self, index: int) -> torch.Tensor:
        """Sample ``index``'s image alone (a label-free run reads only this)."""
        return self.render(self.layout(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        layout = self.layout(index)
        return self.render(layout), layout.label


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise InputError(f"recall: {what}")


def _check(st: RecallStage, in_chans: int, num_classes: int, glyph: int, where: str = "") -> None:
    """One `error:` line per impossible setting, saying what to change (``where``: which curriculum stage)."""
    pairs, num_keys, distance, distractors, hops = st.pairs, st.num_keys, st.distance, st.distractors, st.hops
    _need(
        isinstance(pairs, int) and 1 <= pairs <= num_classes,
        f"{where}pairs must be in [1, num_classes={num_classes}] (values are distinct in an image), got {pairs!r}",
    )
    _need(isinstance(hops, int) and hops >= 1, f"{where}hops must be an int >= 1, got {hops!r}")
    _need(
        isinstance(num_keys, int) and num_keys >= pairs * hops,
        f"{where}num_keys must be >= pairs x hops = {pairs * hops} (keys are distinct in an image), "
        f"got {num_keys!r}",
    )
    _need(
        isinstance(distractors, int) and distractors >= 0,
        f"{where}distractors must be an int >= 0, got {distractors!r}",
    )
    _need(
        isinstance(distance, int) and distance >= 1,
        f"{where}distance must be an int >= 1 cell, got {distance!r}",
    )
    _need(
        isinstance(st.img_size, int) and st.img_size > 0,
        f"{where}img_size must be a positive int, got {st.img_size!r}",
    )
    bits = in_chans * glyph * glyph // 2
    _need(
        2**bits - 2 >= num_keys + num_classes + 1,
        f"{where}a half glyph of {in_chans}x{glyph}x{glyph // 2} bits cannot code {num_keys} keys, {num_classes} "
        f"values and the marker; raise glyph or in_chans, or lower num_keys",
    )
    grid = st.img_size // glyph
    _need(
        grid > distance,
        f"{where}img_size={st.img_size} holds a {grid}x{grid} grid of {glyph}-px glyphs, too small for "
        f"distance={distance}: need img_size >= {(distance + 1) * glyph} or a smaller distance",
    )
    _need(
        hops == 1 or grid >= max(2 * distance + 1, hops + 1),
        f"{where}hops={hops} chains glyphs each distance={distance} cells from the last, which needs a grid of "
        f"at least {max(2 * distance + 1, hops + 1)} glyphs a side (img_size >= "
        f"{max(2 * distance + 1, hops + 1) * glyph}), got {grid}: raise img_size or lower distance",
    )
    _need(
        grid * grid >= pairs * hops + 1 + distractors,
        f"{where}a {grid}x{grid} grid holds {grid * grid} glyphs, fewer than pairs x hops + query + distractors "
        f"= {pairs * hops + 1 + distractors}; raise img_size or lower pairs/distractors",
    )


_STAGE_KEYS = ("epochs", "img_size", "pairs", "num_keys", "distractors", "distance", "hops")


def _curriculum(
    stages: Sequence[dict] | None, final: RecallStage, in_chans: int, num_classes: int, glyph: int
) -> list[tuple[int, RecallStage]]:
    """(last epoch, stage) for each ``{epochs: n, KNOB: value, ...}`` (knobs not named: the task's own)."""
    out: list[tuple[int, RecallStage]] = []
    last = -1
    _need(isinstance(stages or (), (list, tuple)), f"curriculum must be a list of stages, got {stages!r}")
    for i, raw in enumerate(stages or ()):
        where = f"curriculum[{i}]: "
        _need(
            isinstance(raw, dict), f"{where}each stage is a mapping like {{epochs: 2, pairs: 2}}, got {raw!r}"
        )
        unknown = sorted(set(raw) - set(_STAGE_KEYS))
        _need(not unknown, f"{where}unknown key(s) {unknown}; a stage takes {', '.join(_STAGE_KEYS)}")
        epochs = raw.get("epochs")
        _need(isinstance(epochs, int) and epochs >= 1, f"{where}epochs must be an int >= 1, got {epochs!r}")
        st = RecallStage(**{**final.__dict__, **{k: v for k, v in raw.items() if k != "epochs"}})
        _check(st, in_chans, num_classes, glyph, where)
        last += epochs
        out.append((last, st))
    return out


@register_dataset("recall", info=RECALL_INFO, reads_root=False)
def build_recall(
    split: str,
    *,
    root: str | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    num_classes: int = 10,
    length: int = 50_000,
    val_length: int = 2_000,
    glyph: int = 4,
    pairs: int | None = None,
    num_keys: int = 16,
    distractors: int = 0,
    distance: int = 4,
    hops: int = 1,
    curriculum: Sequence[dict] | None = None,
) -> RecallImages:
    """Recall split (``root`` is ignored): ``length`` train samples an epoch (new each epoch), ``val_length``
    val samples. ``pairs`` defaults to ``num_classes`` (values without keys are then worth chance, or a
    little more where the values near the query, never its pair, are ruled out).
    ``hops``: look-ups from the query's key to its value (each pair a chain of ``hops`` glyphs).
    ``curriculum``: train stages before the task itself, e.g. ``[{epochs: 3, img_size: 32, pairs: 2,
    num_keys: 2}]`` (a model without position embedding runs at every size)."""
    info = built_info("recall", RECALL_INFO, img_size, in_chans, mean, std, num_classes=num_classes)
    img_size, in_chans = info.img_size, info.in_chans
    pairs = num_classes if pairs is None else pairs
    n = length if split == "train" else val_length
    _need(
        isinstance(glyph, int) and glyph >= 2 and glyph % 2 == 0,
        f"glyph must be an even int >= 2 px, got {glyph!r}",
    )
    _need(
        isinstance(num_classes, int) and num_classes >= 2,
        f"num_classes must be >= 2 (the values), got {num_classes!r}",
    )
    # an empty val split would score every run 0 % without a word
    _need(isinstance(n, int) and n >= 1, f"length and val_length must be ints >= 1, got {n!r}")
    stage = RecallStage(img_size, pairs, num_keys, distractors, distance, hops)
    _check(stage, in_chans, num_classes, glyph)
    stages = _curriculum(curriculum, stage, in_chans, num_classes, glyph)
    return RecallImages(info, split=split, length=n, seed=seed, glyph=glyph, stage=stage, curriculum=stages)
