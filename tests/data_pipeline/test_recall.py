"""The recall dataset: deterministic, labelled by construction, and unanswerable from any one local window."""

import itertools
from dataclasses import replace

import pytest
import torch

from attnxfer.data import SampleKey, build_dataset, dataset_info, list_datasets
from attnxfer.data.recall import RecallImages
from attnxfer.errors import InputError
from attnxfer.launch import cli
from tests.helpers import tiny_run

KW = dict(img_size=32, glyph=4, pairs=6, num_keys=12, distractors=3, distance=4, length=64, val_length=32)


def _ds(split="train", **kw) -> RecallImages:
    return build_dataset("recall", split, **{**KW, **kw})


def _cells(x: torch.Tensor, glyph: int) -> torch.Tensor:
    """(rows, cols, C, glyph, glyph) glyph cells of a normalised image, as 0/1 bits (blank: 0.5)."""
    c, s, _ = x.shape
    g = s // glyph
    pixels = x[:, : g * glyph, : g * glyph] * 0.5 + 0.5
    return pixels.reshape(c, g, glyph, g, glyph).permute(1, 3, 0, 2, 4)


def _decode(ds: RecallImages, x: torch.Tensor) -> int:
    """Read the answer from the pixels alone: find the marker, read its key, find the glyph that starts with
    that key and read its right half; while that is another key (a link), look that key up in turn."""
    cells = _cells(x, ds.glyph)
    half = ds.glyph // 2
    left, right = cells[..., :half], cells[..., half:]
    is_query = (right == ds.marker).flatten(2).all(-1)
    assert is_query.sum() == 1, "exactly one query glyph"
    qr, qc = is_query.nonzero()[0].tolist()
    key, seen = left[qr, qc], {(qr, qc)}
    while True:
        matches = [
            (r, c) for r, c in (left == key).flatten(2).all(-1).nonzero().tolist() if (r, c) not in seen
        ]
        assert len(matches) == 1, "exactly one further glyph carries the key"
        seen.add(tuple(matches[0]))
        found = right[matches[0][0], matches[0][1]]
        values = [v for v in range(len(ds.value_codes)) if torch.equal(found, ds.value_codes[v])]
        if values:
            return values[0]
        assert any(torch.equal(found, k) for k in ds.key_codes), "a glyph's right half is a value or a key"
        key = found


def test_registered_with_its_defaults():
    assert "recall" in list_datasets()
    info = dataset_info("recall")
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 3, 64)


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, other = _ds(), _ds(), _ds(seed=1)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(0, 64, 9))
    assert not torch.equal(a[0][0], other[0][0])
    assert not torch.equal(a[0][0], _ds("val")[0][0])  # val is not train
    assert len(_ds("val")) == 32 and len(a) == 64


def test_train_samples_are_new_each_epoch_and_val_fixed():
    train, val = _ds(), _ds("val")
    assert not torch.equal(train[SampleKey(3, 0)][0], train[SampleKey(3, 1)][0])
    assert torch.equal(train[SampleKey(3, 1)][0], train[SampleKey(3, 1)][0])
    assert torch.equal(val[SampleKey(3, 0)][0], val[SampleKey(3, 5)][0])


@pytest.mark.parametrize("img_size,glyph,in_chans", [(32, 4, 3), (37, 2, 3), (64, 8, 1)])
def test_labels_are_the_query_keys_value_read_from_the_pixels(img_size, glyph, in_chans):
    ds = _ds(img_size=img_size, glyph=glyph, in_chans=in_chans)
    labels = []
    for i in range(24):
        x, y = ds[i]
        assert x.shape == (in_chans, img_size, img_size)
        assert _decode(ds, x) == y
        labels.append(y)
    assert len(set(labels)) > 3  # the answer varies


def test_query_and_its_pair_never_share_a_window_of_the_distance():
    ds = _ds(img_size=48, distance=5)
    for i in range(64):
        lay = ds.layout(i)
        (qr, qc), (mr, mc) = lay.query_cell, lay.match_cell
        assert max(abs(qr - mr), abs(qc - mc)) >= 5


def _window(x: torch.Tensor, glyph: int, r0: int, c0: int, side: int) -> torch.Tensor:
    return x[:, r0 * glyph : (r0 + side) * glyph, c0 * glyph : (c0 + side) * glyph]


def _inside(cell, r0, c0, side) -> bool:
    return r0 <= cell[0] < r0 + side and c0 <= cell[1] < c0 + side


def test_no_window_of_the_distance_determines_the_label():
    """For every window position: a second image that agrees with it on that window has another label
    (change the pair's value outside the window, or ask the query outside the window for another key)."""
    ds = _ds(img_size=32, distance=4, distractors=0)
    side, g = ds.distance, ds.grid
    for i in range(4):
        lay = ds.layout(i)
        x = ds.render(lay)
        for r0 in range(g - side + 1):
            for c0 in range(g - side + 1):
                if not _inside(lay.match_cell, r0, c0, side):
                    j = lay.pair_keys.index(lay.query_key)
                    new = (set(range(ds.info.num_classes)) - set(lay.pair_values)).pop()
                    values = lay.pair_values[:j] + (new,) + lay.pair_values[j + 1 :]
                    other = replace(lay, pair_values=values)
                else:
                    assert not _inside(lay.query_cell, r0, c0, side)
                    k = next(k for k, v in zip(lay.pair_keys, lay.pair_values) if v != lay.label)
                    other = replace(lay, query_key=k)
                y = ds.render(other)
                assert torch.equal(_window(x, ds.glyph, r0, c0, side), _window(y, ds.glyph, r0, c0, side))
                assert other.label != lay.label and _decode(ds, y) == other.label


def test_values_are_distinct_so_reading_them_without_keys_is_chance():
    ds = _ds(pairs=10, num_keys=10)
    for i in range(16):
        lay = ds.layout(i)
        assert sorted(lay.pair_values) == list(range(10)) and len(set(lay.pair_keys)) == 10


@pytest.mark.parametrize(
    "bad,says",
    [
        (dict(glyph=3), "glyph must be an even int"),
        (dict(pairs=11), "pairs must be in"),
        (dict(num_keys=4), "num_keys must be >= pairs"),
        (dict(distance=8), "too small for distance=8"),
        (dict(distractors=60), "fewer than pairs"),
        (dict(glyph=2, in_chans=1, num_keys=6), "cannot code"),
        (dict(distance=0), "distance must be"),
        (dict(hops=0), "hops must be an int >= 1"),
        (dict(hops=2, num_keys=11), r"num_keys must be >= pairs x hops = 12"),
        (dict(hops=2, distance=4), r"hops=2 chains .* at least 9 glyphs a side \(img_size >= 36\)"),
        (dict(hops=3, distance=2, num_keys=18, distractors=46), "fewer than pairs x hops"),
        (dict(length=0), "length and val_length must be ints >= 1, got 0"),  # an empty split scores 0 %
    ],
)
def test_impossible_settings_are_one_clear_error(bad, says):
    with pytest.raises(InputError, match=says):
        _ds(**bad)


def test_a_curriculum_walks_train_epochs_through_its_stages_and_val_stays_the_task():
    stages = [
        {"epochs": 2, "img_size": 16, "pairs": 2, "num_keys": 2, "distance": 2},
        {"epochs": 1, "pairs": 3},
    ]
    train, val = _ds(curriculum=stages), _ds("val", curriculum=stages)
    assert [train.stage_of(e).pairs for e in range(5)] == [2, 2, 3, 6, 6]
    x, y = train[SampleKey(0, 1)]
    assert x.shape[-1] == 16 and _decode(train, x) == y  # a stage's image, labelled as any other
    assert all(set(train.layout(SampleKey(i, 0)).pair_keys) <= {0, 1} for i in range(8))
    x, y = train[SampleKey(0, 2)]
    assert x.shape[-1] == 32 and _decode(train, x) == y
    assert val.layout(SampleKey(0, 0)).img_size == 32 and len(val.layout(0).pair_keys) == 6
    assert train.fingerprint() != _ds().fingerprint()


@pytest.mark.parametrize(
    "stage,says",
    [
        ({"pairs": 2}, r"curriculum\[0\]: epochs must be"),
        ({"epochs": 1, "glyph": 2}, r"curriculum\[0\]: unknown key\(s\) \['glyph'\]"),
        ({"epochs": 1, "img_size": 16, "distance": 4}, r"curriculum\[0\]: img_size=16 .* too small"),
    ],
)
def test_a_bad_curriculum_stage_is_one_clear_error(stage, says):
    with pytest.raises(InputError, match=says):
        _ds(curriculum=[stage])
    with pytest.raises(InputError, match=r"curriculum must be a list of stages, got \{"):
        _ds(curriculum=stage)  # data.kwargs.curriculum={epochs: 1}: one stage, not a list of them


TWO_HOPS = dict(hops=2, img_size=40, distance=4, num_keys=12)


@pytest.mark.parametrize("hops", [2, 3])
def test_with_hops_the_label_is_read_by_following_the_chain_from_the_pixels(hops):
    ds = _ds(hops=hops, img_size=40, distance=4, num_keys=6 * hops, distractors=3)
    for i in range(24):
        x, y = ds[i]
        lay = ds.layout(i)
        assert len(lay.link_cells) == 6 * (hops - 1) and len(lay.pair_cells) == 6
        assert _decode(ds, x) == y == lay.label
        chain = [lay.query_cell, *lay.chain()]
        assert len(chain) == hops + 1
        # each look-up crosses at least `distance` cells
        assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 4 for a, b in itertools.pairwise(chain))


def test_with_two_hops_the_query_keys_own_glyph_holds_a_key_not_a_value():
    """One look-up from the query lands on a link, whose right half is a key: reading values takes the second."""
    ds = _ds(**TWO_HOPS)
    for i in range(16):
        lay = ds.layout(i)
        first = lay.chain()[0]
        assert first in lay.link_cells and first not in lay.pair_cells
        to = dict(lay.link_keys)[lay.query_key]
        assert to in lay.pair_keys and to != lay.query_key


def test_with_two_hops_no_window_of_the_distance_determines_the_label():
    """For every window position, a second image agrees with the first on that window and has another label:
    the pair's value changed, or the query asking for another chain, or the query's link pointing to another
    chain's pair; at least one of the query, its link and its pair is outside any window of the distance."""
    ds = _ds(**TWO_HOPS, distractors=0)
    side, g = ds.distance, ds.grid
    for i in range(3):
        lay = ds.layout(i)
        x = ds.render(lay)
        link, pair = lay.chain()
        links = list(lay.link_keys)
        j = lay.link_cells.index(link)
        for r0 in range(g - side + 1):
            for c0 in range(g - side + 1):
                if not _inside(pair, r0, c0, side):
                    p = lay.pair_cells.index(pair)
                    new = (set(range(ds.info.num_classes)) - set(lay.pair_values)).pop()
                    other = replace(lay, pair_values=lay.pair_values[:p] + (new,) + lay.pair_values[p + 1 :])
                elif not _inside(lay.query_cell, r0, c0, side):
                    other = replace(lay, query_key=next(a for a, _ in links if a != lay.query_key))
                else:
                    assert not _inside(link, r0, c0, side)
                    k = next(
                        k for k, c in enumerate(lay.link_cells) if k != j and not _inside(c, r0, c0, side)
                    )
                    links[j], links[k] = (links[j][0], links[k][1]), (links[k][0], links[j][1])
                    other = replace(lay, link_keys=tuple(links))
                    links = list(lay.link_keys)
                y = ds.render(other)
                assert torch.equal(_window(x, ds.glyph, r0, c0, side), _window(y, ds.glyph, r0, c0, side))
                assert other.label != lay.label and _decode(ds, y) == other.label


def test_hops_change_the_data_identity_and_a_curriculum_stage_can_set_them():
    one, two = _ds(img_size=40, num_keys=12), _ds(**TWO_HOPS)
    assert one.fingerprint() != two.fingerprint()
    assert one.layout(0).link_cells == ()  # one hop: the pairs of before, no links
    train = _ds(**TWO_HOPS, curriculum=[{"epochs": 1, "hops": 1, "img_size": 16, "pairs": 2, "distance": 2}])
    assert [train.stage_of(e).hops for e in range(3)] == [1, 2, 2]
    x, y = train[SampleKey(0, 0)]
    assert train.layout(SampleKey(0, 0)).link_cells == () and _decode(train, x) == y
    x, y = train[SampleKey(0, 1)]
    assert len(train.layout(SampleKey(0, 1)).link_cells) == 6 and _decode(train, x) == y


@pytest.mark.parametrize(
    ("side", "dynamic", "says"),
    [
        (28, False, "the student runs at its own 32 px only; build it with dynamic_img_size=true"),
        (30, True, "cannot run at 30 px: 4 px patches: 30 px is not a multiple of 4 px"),
    ],
)
def test_a_curriculum_stage_at_a_size_the_student_cannot_run_is_refused_before_training(
    tmp_path, capsys, side, dynamic, says
):
    """A stage's images meet the model only when its epoch comes: a size the patches do not tile, or any other
    size for a model of one fixed size, stopped that epoch's first step in timm's assertion."""
    kwargs = "{patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2" + (
        ", dynamic_img_size: true}" if dynamic else "}"
    )
    argv = [
        "train",
        f"run_dir={tmp_path / 'run'}",
        *tiny_run(16, 8),
        "data.dataset=recall",
        "data.img_size=32",
    ]
    argv += ["model.name=vit_tiny_patch16_224", f"model.kwargs={kwargs}", "transfer.mode=none"]
    argv += [f"data.kwargs.curriculum=[{{epochs: 1, img_size: {side}, pairs: 1, distance: 1}}]"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"a data.kwargs.curriculum stage's img_size={side}: " in err and says in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def _chi2(table: torch.Tensor) -> float:
    """Pearson's chi-square of a contingency table against independence (one row: against uniform)."""
    table = table.double()
    if table.shape[0] == 1:
        expected = torch.full_like(table, float(table.mean()))
    else:
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def test_labels_are_balanced_and_tell_nothing_of_the_query_key_or_where_the_query_sits():
    """A shortcut through the label's marginal: 1,000 layouts, labels uniform over the 10 classes and
    independent of the query's key and of the query's half of the image (chi-square with 9 degrees of
    freedom under 27.88: p > 0.001)."""
    ds = _ds(pairs=10, num_keys=16, length=1000)
    table = torch.zeros(3, 2, 10)  # (label alone, by key parity, by the query's half) x 2 x classes
    for lay in map(ds.layout, range(1000)):
        table[0, 0, lay.label] += 1
        table[1, lay.query_key % 2, lay.label] += 1
        table[2, int(lay.query_cell[0] < ds.grid // 2), lay.label] += 1
    assert _chi2(table[0, :1]) < 27.88
    assert _chi2(table[1]) < 27.88 and _chi2(table[2]) < 27.88


def test_the_recall_teachers_val_images_are_1024_tokens_and_near_values_ruled_out_are_worth_12_1_percent():
    """What docs/choosing-attention.md and docs/data.md say of `recall/teacher`'s 1,000 val images: 128 px of
    4-px glyphs (32 x 32 = 1,024 tokens of its patch-4 model), and a reader that knows every value but not
    its key, ruling out those within `distance` of the query (the queried pair never is), gets 12.1 %."""
    from attnxfer.config import load_config

    cfg = load_config("recall/teacher")
    kwargs = {k: v for k, v in cfg.data.kwargs.items() if k != "curriculum"}
    ds = build_dataset("recall", "val", img_size=cfg.data.img_size, seed=cfg.seed, **kwargs)
    assert len(ds) == 1000 and ds.image(0).shape == (3, 128, 128)
    assert (128 // cfg.model.kwargs["patch_size"]) ** 2 == ds.grid**2 == 1024
    worth = 0.0
    for lay in map(ds.layout, range(len(ds))):
        q = lay.query_cell
        far = [
            v for c, v in zip(lay.pair_cells, lay.pair_values) if max(abs(c[0] - q[0]), abs(c[1] - q[1])) >= 8
        ]
        assert lay.label in far
        worth += 1 / len(far)
    assert f"{100 * worth / len(ds):.1f}" == "12.1"


def test_the_knn_bank_of_a_run_with_a_curriculum_holds_the_task_itself_not_its_first_stage():
    """k-NN top-1 compares val embeddings with the bank's: recall/teacher's val split is the task (128 px, 10
    pairs, distance 8), and so must the bank be, not the 32-px, 2-pair images its plain-int indices (epoch 0)
    would read from the curriculum's first stage."""
    from attnxfer.apps.run.loaders import build_bank_loader
    from attnxfer.config import apply_overrides, load_config

    cfg = apply_overrides(load_config("recall/teacher"), {"eval.knn_bank_size": 4, "data.batch_size": 4})
    val = build_dataset("recall", "val", img_size=cfg.data.img_size, seed=cfg.seed, **cfg.data.kwargs)
    bank = build_bank_loader(cfg, val)
    x, y = next(iter(bank))
    assert x.shape == (4, 3, 128, 128) and y.shape == (4,)
    images = bank.dataset.dataset  # the evenly spaced Subset's recall split
    assert images.curriculum == () and images.stage == val.stage
    assert images.layout(0).img_size == 128 and len(images.layout(0).pair_cells) == 10


def test_two_hop_chains_not_asked_for_are_placed_freely_and_one_look_up_is_worth_12_0_percent():
    """What docs/data.md says of `recall/teacher_2hop`'s 1,000 val images: only the queried chain is held to
    `distance` (17 % of the other chains have link and pair within it), and a reader that makes the first
    look-up alone, then rules out the values within `distance` of the link it found, gets 12.0 %."""
    from attnxfer.config import load_config

    cfg = load_config("recall/teacher_2hop")
    kwargs = {k: v for k, v in cfg.data.kwargs.items() if k != "curriculum"}
    ds = build_dataset("recall", "val", img_size=cfg.data.img_size, seed=cfg.seed, **kwargs)
    near = lambda a, b: max(abs(a[0] - b[0]), abs(a[1] - b[1])) < ds.distance
    worth, close, others = 0.0, 0, 0
    for lay in map(ds.layout, range(len(ds))):
        link = lay.match_cell
        far = [v for c, v in zip(lay.pair_cells, lay.pair_values) if not near(c, link)]
        assert lay.label in far and not near(link, lay.query_cell)
        worth += 1 / len(far)
        link_of = {b: c for c, (_, b) in zip(lay.link_cells, lay.link_keys)}
        for c, k, v in zip(lay.pair_cells, lay.pair_keys, lay.pair_values):
            if v != lay.label:
                others += 1
                close += near(c, link_of[k])
    assert f"{100 * worth / len(ds):.1f}" == "12.0" and f"{100 * close / others:.0f}" == "17"
