"""MAE pre-training: masking, the loss against hand computations, the encoder against timm, and a short
real pre-training run (animal-mnist) whose checkpoint loads as a teacher and resumes bit-identically."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import mae_val_case, rewrite_checkpoint_state, run_cli, tiny_run, torchrun_launch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

from attnxfer.apps.run.pretrain import build_mae, pretrain
from attnxfer.config import TrainConfig, load_config
from attnxfer.errors import InputError
from attnxfer.launch import cli
from attnxfer.models import create_vit
from attnxfer.models.mae import (
    MaskedAutoencoder,
    kept_patches,
    masked_patch_loss,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)
from attnxfer.sources import load_teacher
from attnxfer.train.evaluation import evaluate_loss, image_keys
from attnxfer.train.runtime import create_runtime

ROOT = Path(__file__).resolve().parents[2]
# A 2-block micro-ViT MAE on real animal-mnist: 32 images a step, a second or two a run.
TINY = [
    "model.kwargs={depth: 2, embed_dim: 48}",
    "mae.decoder_dim=32",
    "mae.decoder_heads=2",
    "mae.decoder_depth=1",
    "mae.pictures=3",
    "data.batch_size=32",
    "log.progress=false",
    "log.every_steps=2",
    "deterministic=true",
    "checkpoint.every_epoch=false",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=10",
    "schedule.max_steps=8",
]


# -- masking ---------------------------------------------------------------------------------------
# MAE's count, int(L * (1 - mask_ratio)) in its random_masking, by hand: 196 at 0.9 keeps 19 (19.6), 64 at 0.6
# keeps 25 (25.6), 50 at 0.9 keeps 4 (the float 1 - 0.9 is below 0.1: 4.999...), 49 at 0.75 (the demo) 12.
MAE_COUNTS = [(196, 0.9, 19), (196, 0.75, 49), (49, 0.75, 12), (64, 0.6, 25), (50, 0.9, 4), (49, 0.5, 24)]


@pytest.mark.parametrize("n,ratio,kept", [*MAE_COUNTS, (16, 0.75, 4), (9, 0.0, 9), (49, 0.979, 1)])
def test_masking_keeps_exactly_the_requested_share_of_patches_in_every_image(n, ratio, kept):
    assert kept_patches(n, ratio) == kept == int(n * (1 - ratio))  # MAE's own expression, to the patch
    g = torch.Generator().manual_seed(0)
    keep_idx, mask = random_masking(64, n, ratio, generator=g)
    assert keep_idx.shape == (64, kept)
    assert (mask.sum(1) == n - kept).all()  # exactly N - K hidden, per image
    for row, idx in zip(mask, keep_idx):
        assert len(set(idx.tolist())) == kept and idx.tolist() == sorted(idx.tolist())
        assert (row[idx] == 0).all()  # the kept ones are exactly the unmasked ones
    if 0 < kept < n:
        assert len({tuple(r.tolist()) for r in keep_idx}) > 32  # each image draws its own subset


def test_masking_draws_every_patch_equally_often():
    keep_idx, _ = random_masking(20000, 16, 0.75, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(keep_idx.flatten(), minlength=16).float() / 20000
    torch.testing.assert_close(freq, torch.full((16,), 4 / 16), atol=0.015, rtol=0)


def test_mask_ratio_out_of_range_or_keeping_no_patch_is_an_error():
    for ratio in (1.0, 0.99):  # 0.99 of 49 keeps int(0.49) = 0
        with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\) and keep one of 49 patches"):
            random_masking(2, 49, ratio)


# -- patches and loss ------------------------------------------------------------------------------
def test_patchify_orders_patches_in_raster_order_and_inverts():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 block; its first pixel's channels come first (row, col, channel)
    assert p[0, 1, :3].tolist() == [x[0, c, 0, 4].item() for c in range(3)]
    assert p[1, 2, 3:6].tolist() == [x[1, c, 4, 1].item() for c in range(3)]
    assert torch.equal(unpatchify(p, 4, (2, 2), 3), x)


def test_loss_is_zero_for_a_perfect_reconstruction():
    target = torch.randn(3, 10, 16)
    mask = (torch.rand(3, 10) > 0.5).float()
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    assert masked_patch_loss((target - mean) / (var + 1e-6).sqrt(), target, mask, norm_pix=True) == 0
    assert masked_patch_loss(target, target, mask, norm_pix=False) == 0


def test_loss_matches_a_hand_computation():
    pred = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    only_first = torch.tensor([[1.0, 0.0]])
    # patch 0: mean 2, unbiased variance 2 -> normalised target ±1/sqrt(2 + 1e-6); prediction 0
    assert masked_patch_loss(pred, target, only_first).item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)
    assert masked_patch_loss(pred, target, only_first, norm_pix=False).item() == pytest.approx((1 + 9) / 2)
    # patch 1 is flat: its normalised target is 0 and the prediction 1 costs 1; the mean is over masked patches
    both = torch.ones(1, 2)
    assert masked_patch_loss(pred, target, both).item() == pytest.approx((1 / (2 + 1e-6) + 1) / 2, rel=1e-6)
    # an unmasked patch, however wrong, costs nothing
    assert masked_patch_loss(pred + 100 * torch.tensor([[[0.0], [1.0]]]), target, only_first).item() == (
        pytest.approx(1 / (2 + 1e-6), rel=1e-6)
    )


# -- the model -------------------------------------------------------------------------------------
def _tiny_mae(**kwargs) -> MaskedAutoencoder:
    torch.manual_seed(0)
    enc = create_vit("vit_micro_patch4_28", num_classes=0, depth=2, embed_dim=48)
    return MaskedAutoencoder(enc, decoder_dim=32, decoder_heads=2, decoder_depth=1, **kwargs)


def test_a_mask_ratio_that_hides_no_patch_or_keeps_none_is_refused_naming_one_that_works():
    """The loss is on the hidden patches alone (none hidden: a loss of 0 every step), and the encoder needs a
    patch to see: 0.99 of 49 keeps int(0.49) = 0 in MAE's count, refused rather than run on another count."""
    with pytest.raises(InputError, match="hides none of the encoder's 49 patches.*set it above 0"):
        _tiny_mae(mask_ratio=0.0)
    with pytest.raises(
        InputError, match=r"mae.mask_ratio=0.99 keeps none of the encoder's 49 .*at most 0.979 "
    ):
        _tiny_mae(mask_ratio=0.99)
    assert (
        _tiny_mae(mask_ratio=0.005).mask_ratio == 0.005
    )  # int(48.755): one patch hidden, something to learn
    assert _tiny_mae(mask_ratio=0.979).mask_ratio == 0.979  # the one it names keeps int(1.029) = 1


def test_per_patch_normalised_targets_of_one_value_patches_are_refused_not_nan():
    """A 1 px, 1-channel patch has one value, whose unbiased variance is NaN: every loss would be NaN."""
    torch.manual_seed(0)
    enc = create_vit(
        "vit_micro_patch4_28", num_classes=0, depth=1, embed_dim=48, patch_size=1, img_size=8, in_chans=1
    )
    with pytest.raises(InputError, match="mae.norm_pix normalises each patch"):
        MaskedAutoencoder(enc, decoder_dim=32, decoder_heads=2, decoder_depth=1)
    mae = MaskedAutoencoder(enc, decoder_dim=32, decoder_heads=2, decoder_depth=1, norm_pix=False)
    assert torch.isfinite(mae(torch.randn(2, 1, 8, 8)).loss)


@pytest.mark.parametrize(
    "size, says",
    [
        (
            dict(img_size=30),
            "30 px (data.img_size) is not a multiple of 4: nearest sizes that work: 28 px and 32 px",
        ),
        (
            dict(patch_size=56),
            "28 px (data.img_size) is not a multiple of 56: nearest sizes that work: 56 px",
        ),
        # one patch: no mask ratio both hides one and keeps one, so none is advised
        (dict(patch_size=28), "a 28 px image (data.img_size) is one 28 px patch (model.kwargs.patch_size)"),
    ],
)
def test_an_image_that_does_not_cut_into_patches_to_hide_and_keep_is_refused_by_its_keys(size, says):
    encoder = create_vit("vit_micro_patch4_28", num_classes=0, depth=2, embed_dim=48, **size)
    with pytest.raises(InputError, match=re.escape(says)):
        MaskedAutoencoder(encoder, decoder_dim=32, decoder_heads=2, decoder_depth=1)


@pytest.mark.parametrize(
    "name, says",
    [
        ("deit_tiny_distilled_patch16_224", "not a VisionTransformerDistilled"),  # a second prefix token
        ("vit_small_r26_s32_224", "not a ViT with a HybridEmbed stem"),  # a CNN stem that sees every pixel
    ],
)
def test_a_vit_that_is_not_plain_is_refused_by_name_before_any_step(name, says):
    encoder = timm.create_model(name, num_classes=0, depth=1, img_size=64)
    with pytest.raises(InputError, match=f"needs a plain ViT .*, {says}: choose such a model.name"):
        MaskedAutoencoder(encoder, decoder_dim=32, decoder_heads=2, decoder_depth=1)


@pytest.mark.parametrize(
    "prefix", [{}, {"reg_tokens": 4}, {"reg_tokens": 4, "class_token": False, "global_pool": "avg"}]
)
def test_encoder_on_all_patches_is_timms_forward_features(prefix):
    """Each prefix token (class, registers) gets its own position, as in timm: the model pre-trained is the
    model exported."""
    torch.manual_seed(0)
    encoder = create_vit("vit_micro_patch4_28", num_classes=0, depth=2, embed_dim=48, **prefix)
    mae = MaskedAutoencoder(encoder, decoder_dim=32, decoder_heads=2, decoder_depth=1).eval()
    x = torch.randn(4, 1, 28, 28)
    everything = torch.arange(49).expand(4, -1)
    torch.testing.assert_close(mae.forward_encoder(x, everything), mae.encoder.forward_features(x))


def test_encoder_on_kept_patches_equals_timm_on_those_tokens_alone():
    """Masking = running timm's blocks on [cls + pos, kept patches + their pos] only."""
    mae = _tiny_mae().eval()
    enc = mae.encoder
    x = torch.randn(2, 1, 28, 28)
    keep_idx, _ = random_masking(2, 49, 0.75, generator=torch.Generator().manual_seed(3))
    tokens = enc._pos_embed(enc.patch_embed(x))  # (B, 1 + 49, D), timm's own embedding
    kept = torch.stack([torch.cat([t[:1], t[1:][i]]) for t, i in zip(tokens, keep_idx)])
    torch.testing.assert_close(mae.forward_encoder(x, keep_idx), enc.norm(enc.blocks(kept)))


def test_state_dict_has_maes_checkpoint_layout_and_shares_the_encoders_weights():
    mae = _tiny_mae()
    keys = set(mae.state_dict())
    enc_keys = set(mae.encoder.state_dict())
    assert enc_keys <= keys  # timm's names, unprefixed
    assert keys - enc_keys == {k for k in keys if k.startswith("decoder_") or k == "mask_token"}
    with torch.no_grad():
        mae.blocks[0].attn.qkv.weight.add_(1.0)
    assert torch.equal(mae.encoder.blocks[0].attn.qkv.weight, mae.state_dict()["blocks.0.attn.qkv.weight"])
    assert not mae.decoder_pos_embed.requires_grad  # fixed sin-cos, as MAE


def test_a_step_only_trains_from_masked_patches_of_the_image():
    mae = _tiny_mae(mask_ratio=0.75)
    out = mae(torch.randn(2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    assert out.pred.shape == (2, 49, 16) and (out.mask.sum(1) == 37).all()
    out.loss.backward()
    assert mae.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and mae.mask_token.grad.abs().sum() > 0


def _maes_sincos(dim: int, rows: int, cols: int) -> torch.Tensor:
    """He et al.'s 2-D sin-cos embedding written out position by position: for the patch in row i, column j,
    sin and cos of j·w_k, then sin and cos of i·w_k, w_k = 10000^(-k / (dim/4)) (MAE's util/pos_embed.py)."""
    q, out = dim // 4, torch.zeros(rows * cols, dim, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            for k in range(q):
                w = 10000.0 ** (-k / q)
                out[i * cols + j, [k, q + k, 2 * q + k, 3 * q + k]] = torch.tensor(
                    [math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)], dtype=torch.float64
                )
    return out.float()


def test_sincos_embedding_is_maes_columns_then_rows():
    torch.testing.assert_close(sincos_pos_embed_2d(8, (2, 3)), _maes_sincos(8, 2, 3))


def test_a_fresh_pretrainings_encoder_is_initialised_as_maes():
    """He et al. initialise every Linear, and the patch embedding as one, xavier-uniform: U(±a), a = sqrt(6 /
    (fan_in + fan_out)), so a standard deviation of a/sqrt(3), Linear biases 0 (timm's own: N(0, 0.02²))."""
    torch.manual_seed(0)
    enc = build_mae(load_config("demo/mae_pretrain", TINY), in_chans=1, img_size=None).encoder
    kernel = enc.patch_embed.proj.weight.flatten(1)
    weights = [(kernel, None)] + [  # the patch embedding's bias keeps torch's Conv2d init, as in MAE
        (m.weight, m.bias) for m in enc.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert len(weights) == 1 + 2 * 4  # patches; per block qkv, proj, fc1, fc2
    for w, b in weights:
        a = math.sqrt(6 / sum(w.shape))
        assert w.abs().max() <= a and w.std().item() == pytest.approx(a / math.sqrt(3), rel=0.1)
        assert b is None or not b.any()
    assert enc.cls_token.std().item() == pytest.approx(0.02, rel=0.3)


@pytest.mark.parametrize("prefix", [[], ["model.kwargs={depth: 2, embed_dim: 48, reg_tokens: 2}"]])
def test_pretrainings_encoder_and_decoder_have_maes_fixed_sincos_positions(prefix):
    """MAE's encoder positions are fixed sin-cos like its decoder's (0 on the prefix tokens), not timm's learned
    random ones: a step leaves them as they are."""
    mae = build_mae(load_config("demo/mae_pretrain", [*TINY, *prefix]), in_chans=1, img_size=None)
    n_pre = mae.encoder.num_prefix_tokens
    for pos, dim, skip in ((mae.encoder.pos_embed, 48, n_pre), (mae.decoder_pos_embed, 32, 1)):
        assert not pos.requires_grad and not pos[0, :skip].any()
        torch.testing.assert_close(pos[0, skip:], _maes_sincos(dim, 7, 7))
    before = mae.encoder.pos_embed.clone()
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=0.1)
    mae(torch.randn(2, 1, 28, 28)).loss.backward()
    opt.step()
    assert torch.equal(mae.encoder.pos_embed, before)


# -- a real pre-training run -----------------------------------------------------------------------
# -- the val loss ------------------------------------------------------------------------------------
def _val_loss(acc, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """(val loss, images) of `mae_val_case`'s share ``rank`` of ``world_size``, scored by this process."""
    mae, loader = mae_val_case(batch_size, rank, world_size)
    return evaluate_loss(mae, loader, acc, seed=5)["loss"], len(loader.sampler)


def test_an_images_val_mask_is_its_own_whatever_its_batch_or_shard():
    """Each image's mask comes from its index in the val set: scored in batches of 3 or of 8, or as two ranks'
    shards (images 0, 2, ... and 1, 3, ...) put together, the val set's loss is the same."""
    acc = create_runtime("cpu", "fp32").accelerator
    whole, n = _val_loss(acc, 8)
    assert n == 11
    assert _val_loss(acc, 3)[0] == pytest.approx(whole, abs=1e-6)
    shards = [_val_loss(acc, 3, rank, 2) for rank in (0, 1)]
    assert sum(loss * n for loss, n in shards) / 11 == pytest.approx(whole, abs=1e-6)


def test_val_masks_are_keyed_by_dataset_index_and_a_streams_by_its_turn_in_the_stream():
    """An indexable val set's images are keyed by their index (rank 1 of 2: 1, 3, ...); a stream has none to
    read, so rank r of W keys its k-th image k·W + r, the stream's own order where ranks take turns."""
    _, loader = mae_val_case(3, rank=1, world_size=2)
    assert list(image_keys(loader, 1, 2)) == [1, 3, 5, 7, 9]
    stream = DataLoader(_Stream(), batch_size=3)
    assert list(islice(image_keys(stream, 1, 2), 4)) == [1, 3, 5, 7]


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.zeros(4, 1))


@pytest.mark.slow
def test_two_processes_score_the_same_mae_val_loss_as_one(tmp_path):
    """tests/dist_mae_val.py on two torchrun ranks in a gloo group, each scoring its exact share in batches of 3:
    the val loss one process gives all 11 images in batches of 8, so a run's val loss is its model's whatever
    the world size."""
    launch, env = torchrun_launch(ranks=2)
    script = str(Path(__file__).resolve().parents[1] / "dist_mae_val.py")
    done = subprocess.run(
        [*launch, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, _ = _val_loss(create_runtime("cpu", "fp32").accelerator, 8)
    assert float((tmp_path / "loss").read_text()) == pytest.approx(one, abs=1e-6)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mae") / "ref"
    res = pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={run}"]))
    assert res.steps == 8 and res.metric == "val_loss" and math.isfinite(res.best)
    return run


@pytest.mark.slow
def test_pretraining_writes_checkpoints_metrics_pictures_and_a_timm_export(pretrained_run):
    run = pretrained_run
    assert {p.name for p in (run / "checkpoints").glob("step-*")} == {"step-00000004", "step-00000008"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8]
    assert all("mae" in r and "task" not in r for r in records if r["split"] == "train")
    assert [r["val_loss"] for r in records if r["split"] == "val"]
    pictures = list((run / "pictures").glob("val-reconstruction-step*.png"))
    assert [p.name for p in pictures] == ["val-reconstruction-step00000008.png"]
    from PIL import Image

    w, h = Image.open(pictures[0]).size
    assert (w, h) == (4 * (3 * 29 + 1), 4 * (3 * 29 + 1))  # 3 images x (masked, reconstruction, original)
    assert list((run / "tb").glob("events.*"))
    export = run / "export"
    plain = timm.create_model(f"local-dir:{export}", pretrained=True)
    ckpt = load_file(str(run / "checkpoints" / "step-00000008" / "model.safetensors"))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, ckpt[k]), k
    torch.testing.assert_close(ckpt["pos_embed"][0, 1:], _maes_sincos(48, 7, 7))  # fixed through training
    # the card names what the encoder is, not only the architecture it was built as
    card = (export / "README.md").read_text()
    assert "\n# ref\n" in card  # named after its run, not after the folder "export"
    what = f"A ViT of width {plain.embed_dim}, {len(plain.blocks)} blocks"
    assert (
        f"{what}, " in card and "(built as vit_micro_patch4_28), an encoder pre-trained as a masked" in card
    )


@pytest.mark.slow
def test_a_pretrainings_card_lists_its_training_data_as_read_without_labels(pretrained_run):
    """The demo's recipe reads animal-mnist with data.labels: true (the loaders hand labels out), but MAE's
    loss reads none: the card's training data says so rather than copying the recipe's labels: true."""
    card = (pretrained_run / "export" / "README.md").read_text()
    data = card.split("## Training data", 1)[1].split("## Metrics", 1)[0]
    assert "no label was read in training" in data and "labels: false" in data and "labels: true" not in data


@pytest.mark.slow
def test_pretrainings_export_at_its_end_does_not_call_the_run_still_training(tmp_path, capsys):
    """The run exports its own last checkpoint: no notice that the weights are not the run's final ones."""
    pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={tmp_path}", "schedule.max_steps=2"]))
    err = capsys.readouterr().err
    assert (tmp_path / "export" / "model.safetensors").is_file() and "still training" not in err, err


@pytest.mark.slow
def test_a_pretraining_trained_longer_keeps_its_earlier_export_aside(tmp_path, capsys):
    """The earlier export is the teacher of runs that check it by hash: replaced in place, those runs could no
    longer resume, and the weights they name were gone (the checkpoint it came from pruned)."""
    pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={tmp_path}", "schedule.max_steps=2"]))
    before = (tmp_path / "export" / "model.safetensors").read_bytes()
    pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={tmp_path}", "schedule.max_steps=4"]))
    (aside,) = tmp_path.glob("export.replaced-*")
    assert (aside / "model.safetensors").read_bytes() == before and f"as {aside}" in capsys.readouterr().out
    assert (tmp_path / "export" / "model.safetensors").read_bytes() != before


@pytest.mark.slow
def test_mae_checkpoint_loads_as_a_teacher_without_its_decoder(pretrained_run, capsys):
    ckpt_file = pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"
    ckpt = load_file(str(ckpt_file))
    decoder = sorted(k for k in ckpt if k.startswith("decoder_") or k == "mask_token")
    assert decoder and "decoder_pos_embed" in decoder
    capsys.readouterr()
    teacher, record = load_teacher(str(ckpt_file), arch="vit_micro_patch4_28", depth=2, embed_dim=48)
    warned = capsys.readouterr().err
    assert sorted(record.dropped_keys) == decoder
    assert "dropped" in warned and "decoder_blocks" in warned
    state = teacher.state_dict()
    assert not [k for k in state if k.startswith("decoder_") or k == "mask_token"]
    for k, v in state.items():
        assert torch.equal(v, ckpt[k]), k
    # the exported folder is a teacher spec like any other, and a student can copy from it
    t2, rec2 = load_teacher(f"local-dir:{pretrained_run / 'export'}")
    assert rec2.dropped_keys == [] and rec2.num_classes == 0
    for k, v in t2.state_dict().items():
        assert torch.equal(v, ckpt[k]), k


@pytest.mark.slow
def test_resume_mid_pretraining_is_bit_identical(pretrained_run, tmp_path, capsys):
    """Resume from the step-4 checkpoint (mid-epoch: 281 steps an epoch) and compare step 8 bit for bit."""
    step4 = pretrained_run / "checkpoints" / "step-00000004"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(step4, resumed / "checkpoints" / step4.name)
    pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={resumed}", "mae.export=false"]))
    assert "resumed from checkpoint step 4" in capsys.readouterr().out
    a = load_file(str(pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = load_file(str(pretrained_run / "checkpoints" / "step-00000008" / "optimizer.safetensors"))
    ob = load_file(str(resumed / "checkpoints" / "step-00000008" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


@pytest.mark.slow
def test_a_pretraining_begun_with_learned_encoder_positions_resumes_and_goes_on_learning_them(
    tmp_path, monkeypatch, capsys
):
    """A run checkpointed while the encoder's positions were trained has them in its optimiser state: it
    resumes, and they keep learning, rather than the optimiser's groups no longer fitting."""
    with monkeypatch.context() as m:
        m.setattr("attnxfer.apps.run.pretrain.init_encoder_as_mae", lambda encoder: None)
        pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={tmp_path}", "mae.export=false"]))
    (tmp_path / "checkpoints" / "step-00000008").rename(tmp_path / "later")
    pretrain(load_config("demo/mae_pretrain", [*TINY, f"run_dir={tmp_path}", "mae.export=false"]))
    assert "resumed from checkpoint step 4" in capsys.readouterr().out
    step4, step8 = (
        load_file(str(tmp_path / "checkpoints" / s / "model.safetensors"))
        for s in ("step-00000004", "step-00000008")
    )
    assert not torch.equal(step4["pos_embed"], step8["pos_embed"])


@pytest.mark.slow
def test_a_pretraining_records_no_transfer_section_and_an_older_folder_with_one_goes_on(
    pretrained_run, tmp_path, capsys
):
    """MAE reads no transfer key: its config.yaml and checkpoints leave the section out (the teacher section
    stays: model.init's downloads go to teacher.cache_dir). A folder an older attnxfer wrote with the section
    (transfer.mode none, as a run told so wrote it) exports without it in its card's recipe and resumes from
    its own config.yaml; eval of a pretraining refuses a transfer key it would drop."""
    written = yaml.safe_load((pretrained_run / "config.yaml").read_text())
    recorded = json.loads((pretrained_run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert "transfer" not in written and "transfer" not in recorded["config"] and "teacher" in written
    old, step4 = tmp_path / "old", pretrained_run / "checkpoints" / "step-00000004"
    shutil.copytree(step4, old / "checkpoints" / step4.name)
    shutil.copy(pretrained_run / "run.json", old)
    defaults = {**dataclasses.asdict(TrainConfig().transfer), "mode": "none"}  # what pretraining does
    rewrite_checkpoint_state(
        old / "checkpoints" / step4.name / "state.json", lambda s: s["config"].update(transfer=defaults)
    )
    config = yaml.safe_dump({**written, "run_dir": str(old), "transfer": defaults}, sort_keys=False)
    (old / "config.yaml").write_text(config)
    code, _, err = run_cli(capsys, "export", str(old), str(tmp_path / "card"))
    recipe = (tmp_path / "card" / "README.md").read_text().split("## Recipe", 1)[1].split("## How to load")[0]
    assert code == 0 and "mask_ratio: 0.75" in recipe and "transfer" not in recipe, err
    code, out, err = run_cli(capsys, "pretrain", "-c", str(old / "config.yaml"))
    assert code == 0 and "resumed from checkpoint step 4" in out, err
    code, _, err = run_cli(
        capsys, "eval", "-c", str(old / "config.yaml"), "eval.metrics=[]", "transfer.mode=copy"
    )
    assert code == 2 and "and `attnxfer pretrain` reads no transfer.*; remove it" in err, err


@pytest.mark.slow
def test_evals_of_a_pretraining_step_at_other_mae_settings_are_kept_apart(pretrained_run, tmp_path, capsys):
    """The val loss depends on mae.*: each eval records them, so a second one at another mask_ratio does not
    replace the first's scores. A checkpoint written without its mae section (its keys go unjudged) lets
    the ratio change."""
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    state_file = run / "checkpoints" / "step-00000008" / "state.json"
    rewrite_checkpoint_state(state_file, lambda state: state["config"].pop("mae"))

    def scored(*overrides: str) -> Path:
        args = ["eval", "-c", str(run / "config.yaml"), f"run_dir={run}", "eval.metrics=[]", *overrides]
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        return Path(out.strip().splitlines()[-1].rsplit(" -> ", 1)[1])

    first = scored()
    kept = first.read_bytes()
    other = scored("mae.mask_ratio=0.5")
    assert other != first and first.read_bytes() == kept
    records = [json.loads(p.read_text()) for p in (first, other)]
    assert [r["config"]["mae"]["mask_ratio"] for r in records] == [0.75, 0.5]
    trained = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in trained if r["split"] == "val" and r["step"] == 8]
    assert records[0]["metrics"]["val_loss"] == pytest.approx(val[-1])  # as the run scored it: mask 0.75
    assert records[1]["metrics"]["val_loss"] != pytest.approx(val[-1])
    assert scored() == first  # the first evaluation again replaces only its own scores


# a run whose best checkpoint is not its last: 2 epochs at a sane lr (val loss falls from step 2 to 4), then
# resumed for a 3rd at lr 10, whose steps wreck the weights (val loss at step 6 many times step 4's). A single
# run at one overshooting lr left the order of its val losses to float rounding, which differs between CPUs.
OVERSHOT = [
    "data.dataset=synthetic",
    "data.kwargs={length: 64}",
    "optim.lr=10",
    "schedule.max_steps=null",
    "schedule.epochs=3",
    "schedule.warmup_epochs=0",
    "checkpoint.every_steps=null",
    "checkpoint.every_epoch=true",
]


@pytest.fixture(scope="module")
def overshot_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mae") / "overshot"
    pretrain(
        load_config(
            "demo/mae_pretrain", [*TINY, *OVERSHOT, "optim.lr=1e-2", "schedule.epochs=2", f"run_dir={run}"]
        )
    )
    pretrain(load_config("demo/mae_pretrain", [*TINY, *OVERSHOT, f"run_dir={run}"]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if r["split"] == "val"}
    assert min(val, key=val.get) == 4 and max(val) == 6, val  # else best and latest are one checkpoint
    return run


def _is_checkpoint(weights: dict[str, torch.Tensor], run: Path, step: int) -> bool:
    ckpt = load_file(str(run / "checkpoints" / f"step-{step:08d}" / "model.safetensors"))
    return all(torch.equal(v, ckpt[k]) for k, v in weights.items())


@pytest.mark.slow
def test_pretraining_exports_its_last_checkpoint_not_its_lowest_val_loss(overshot_run, capsys):
    """MAE fine-tunes its final pre-training weights, and the demo's teacher is the last checkpoint: the
    run's export is that one, and the card and the printed line say so."""
    export = overshot_run / "export"
    assert _is_checkpoint(load_file(str(export / "model.safetensors")), overshot_run, 6)
    assert not _is_checkpoint(load_file(str(export / "model.safetensors")), overshot_run, 4)
    assert "- weights: step-00000006 (latest), raw weights" in (export / "README.md").read_text()
    # a finished run resumed without its export writes it again, saying which checkpoint
    shutil.rmtree(export)
    capsys.readouterr()
    pretrain(load_config("demo/mae_pretrain", [*TINY, *OVERSHOT, f"run_dir={overshot_run}"]))
    out = capsys.readouterr().out
    assert (
        "encoder of the last checkpoint, step-00000006 (MAE's rule: not the lowest val loss), exported" in out
    )
    assert _is_checkpoint(load_file(str(export / "model.safetensors")), overshot_run, 6)


@pytest.mark.slow
def test_a_pretraining_run_folder_is_the_teacher_its_export_holds(overshot_run, tmp_path, capsys):
    """Read as a model (`inspect`'s TEACHER or STUDENT, `attnxfer export`'s default) a pre-training run's
    folder gives its last checkpoint, the export's weights; --checkpoint best names the lowest val loss. As
    teacher.spec the folder is refused, naming the export."""
    from attnxfer.apps.inspect.inspect import load_model

    model = load_model(str(overshot_run), role="teacher").model
    assert _is_checkpoint(model.state_dict(), overshot_run, 6)
    code, _, _ = run_cli(capsys, "export", str(overshot_run), str(tmp_path / "default"))
    assert code == 0 and _is_checkpoint(
        load_file(str(tmp_path / "default" / "model.safetensors")), overshot_run, 6
    )
    code, _, _ = run_cli(capsys, "export", str(overshot_run), str(tmp_path / "best"), "--checkpoint", "best")
    assert code == 0 and _is_checkpoint(
        load_file(str(tmp_path / "best" / "model.safetensors")), overshot_run, 4
    )
    for spec in (str(overshot_run), f"local-dir:{overshot_run}"):
        with pytest.raises(InputError, match=re.escape(f"use local-dir:{overshot_run / 'export'}")):
            load_teacher(spec)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_pretrained_encoder(pretrained_run):
    from attnxfer.apps.run.parts import init_from_pretrained
    from attnxfer.config import ModelConfig

    m = ModelConfig(init=f"local-dir:{pretrained_run / 'export'}", drop_path_rate=0.0)
    student = init_from_pretrained(m, 10, None, None, {})
    ckpt = load_file(str(pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"))
    assert student.head.out_features == 10 and all(p.requires_grad for p in student.parameters())
    for k, v in student.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, ckpt[k]), k


@pytest.mark.slow
def test_fine_tuning_keeps_the_configs_pooling_and_says_a_model_name_it_does_not_build(
    pretrained_run, capsys
):
    """MAE's fine-tuning recipe: average pooling, a fresh norm after it and the encoder's final norm dropped;
    the rest is the pretrained encoder. A model.name of another width is said to be unused."""
    from attnxfer.apps.run.parts import build_student

    spec = f"local-dir:{pretrained_run / 'export'}"
    cfg = load_config(
        "demo/copy", [f"model.init={spec}", "model.global_pool=avg", "model.name=vit_tiny_patch16_224"]
    )
    student = build_student(cfg, None, 10, 1, None)
    assert student.global_pool == "avg" and isinstance(student.norm, torch.nn.Identity)
    assert torch.equal(student.fc_norm.weight, torch.ones_like(student.fc_norm.weight))
    ckpt = load_file(str(pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"))
    for k, v in student.state_dict().items():
        if k.split(".")[0] not in ("head", "fc_norm"):
            assert torch.equal(v, ckpt[k]), k
    err = capsys.readouterr().err
    assert f"model.name=vit_tiny_patch16_224 is not built: model.init={spec} gives the student its" in err


def _maes_full_checkpoint(pretrained_run: Path, path: Path, **extra) -> dict[str, torch.Tensor]:
    """The run's step-8 weights written as MAE's released ``*_full.pth`` are: ``{"model": state_dict}``
    under MAE's names (encoder unprefixed, ``decoder_*``, ``mask_token``), saved with ``torch.save``."""
    state = load_file(str(pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"))
    torch.save({"model": state, **extra}, path)
    return state


@pytest.mark.slow
def test_pretraining_continues_from_maes_full_checkpoint_encoder_and_decoder(pretrained_run, tmp_path):
    from attnxfer.apps.run.pretrain import build_pretrain_engine

    full = tmp_path / "mae_pretrain_vit_micro_full.pth"
    state = _maes_full_checkpoint(pretrained_run, full, epoch=799)
    cfg = load_config("demo/mae_pretrain", [*TINY, f"run_dir={tmp_path / 'more'}", f"model.init={full}"])
    mae = build_pretrain_engine(cfg).student
    got = mae.state_dict()
    assert set(got) == set(state) and any(k.startswith("decoder_blocks.") for k in state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    # a decoder of another width cannot be loaded: the encoder is, the decoder starts fresh and says so
    other = load_config(
        "demo/mae_pretrain",
        [
            *TINY,
            f"run_dir={tmp_path / 'wider'}",
            f"model.init={full}",
            "mae.decoder_dim=16",
            "mae.decoder_heads=2",
        ],
    )
    from attnxfer.apps.run.pretrain import build_mae, init_mae

    fresh = build_mae(other, in_chans=1, img_size=None)
    note, _ = init_mae(fresh, str(full))
    assert "decoder fresh" in note and "decoder_embed.weight" in note
    got = fresh.state_dict()
    for k, v in state.items():
        if k.startswith("decoder_") or k == "mask_token":
            assert got[k].shape != v.shape or not torch.equal(got[k], v), k
        else:
            assert torch.equal(got[k], v), k


@pytest.mark.slow
def test_maes_checkpoint_with_pickled_objects_or_another_architecture_is_refused(pretrained_run, tmp_path):
    import argparse

    from attnxfer.apps.run.pretrain import build_mae, init_mae
    from attnxfer.sources import UnsafeCheckpointError
    from attnxfer.sources.resolve import TeacherLoadError

    cfg = load_config("demo/mae_pretrain", TINY)
    pickled = tmp_path / "with_args.pth"
    _maes_full_checkpoint(pretrained_run, pickled, args=argparse.Namespace(lr=1.5e-4))
    with pytest.raises(UnsafeCheckpointError, match=r"argparse\.Namespace"):
        init_mae(build_mae(cfg, in_chans=1, img_size=None), str(pickled))
    # a fine-tuned student's weights file: the encoder and a classifier, which the headless encoder leaves out
    from safetensors.torch import load_file, save_file

    state = load_file(str(pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"))
    width = state["cls_token"].shape[-1]
    student = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    save_file(
        {**student, "head.weight": torch.ones(10, width), "head.bias": torch.zeros(10)},
        tmp_path / "s.safetensors",
    )
    mae = build_mae(cfg, in_chans=1, img_size=None)
    note, _ = init_mae(mae, str(tmp_path / "s.safetensors"))
    assert "its classifier (head.bias, head.weight) left out, decoder fresh" in note, note
    assert torch.equal(mae.state_dict()["cls_token"], state["cls_token"])
    wide = load_config("demo/mae_pretrain", [*TINY, "model.kwargs={depth: 2, embed_dim: 96}"])
    with pytest.raises(TeacherLoadError, match=r"does not fit the encoder.*pos_embed"):
        init_mae(
            build_mae(wide, in_chans=1, img_size=None),
            str(pretrained_run / "checkpoints" / "step-00000008" / "model.safetensors"),
        )


def test_pretraining_from_a_model_normalises_by_the_statistics_it_was_trained_on(exported, tmp_path):
    """model.init's mean/std (its config.json's), as fine-tuning from it takes them: an encoder trained on
    other statistics was fed inputs it never saw. A bare weights file records none: the dataset's."""
    from attnxfer.apps.run.pretrain import build_pretrain_engine

    init = tmp_path / "init"
    init.mkdir()
    for f in exported.iterdir():
        (init / f.name).write_bytes(f.read_bytes())
    config = json.loads((init / "config.json").read_text())
    config["pretrained_cfg"].update(mean=[0.25], std=[0.75])
    (init / "config.json").write_text(json.dumps(config))
    one_block = [*tiny_run(64, 16), "model.kwargs={depth: 1, embed_dim: 24, num_heads: 2}"]
    cfg = load_config(
        "demo/mae_pretrain", [*one_block, f"model.init=local-dir:{init}", f"run_dir={tmp_path}/r"]
    )
    encoder = build_pretrain_engine(cfg).student.encoder
    assert (encoder.pretrained_cfg["mean"], encoder.pretrained_cfg["std"]) == ((0.25,), (0.75,))


def test_a_model_init_of_another_architecture_names_the_one_it_is(exported):
    """model.init as a spec (a timm folder, a transformers one mapped to timm) names its architecture nowhere
    the user reads: the refusal says which model.name and model.kwargs build it, and those fit."""
    from attnxfer.apps.run.pretrain import build_mae, init_mae

    spec = f"local-dir:{exported}"
    with pytest.raises(InputError, match=r"it is vit_base_patch16_224 with model.kwargs=\{") as e:
        init_mae(build_mae(load_config("demo/mae_pretrain", TINY), 3, None), spec)
    name, kwargs = re.search(r"it is (\S+) with model.kwargs=(\{.*?\})", str(e.value)).groups()
    cfg = load_config("demo/mae_pretrain", [*TINY, f"model.name={name}", f"model.kwargs={kwargs}"])
    assert f"encoder loaded from {spec}" in init_mae(build_mae(cfg, 3, None), spec)[0]


def test_a_checkpoint_with_a_deeper_decoder_loads_its_encoder_and_starts_the_decoder_fresh(tmp_path):
    """The extra decoder blocks are the decoder's misfit, said on the start-up line, not the encoder's."""
    from safetensors.torch import save_file

    from attnxfer.apps.run.pretrain import init_mae

    torch.manual_seed(1)
    enc = create_vit("vit_micro_patch4_28", num_classes=0, depth=2, embed_dim=48)
    deeper = MaskedAutoencoder(enc, decoder_dim=32, decoder_heads=2, decoder_depth=2)
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, tmp_path / "model.safetensors")
    mae = _tiny_mae()
    note, _ = init_mae(mae, str(tmp_path / "model.safetensors"))
    assert "decoder fresh: the checkpoint's does not fit" in note and "decoder_blocks.1." in note
    assert torch.equal(mae.encoder.pos_embed, enc.pos_embed)
    assert not torch.equal(mae.decoder_blocks[0].attn.qkv.weight, deeper.decoder_blocks[0].attn.qkv.weight)


def test_the_encoder_takes_model_kwargs_in_chans_over_the_datas_as_trains_student_does():
    """It was built with the data's channel count whatever model.kwargs said, without a word."""
    from attnxfer.apps.run.pretrain import build_mae

    cfg = load_config("demo/mae_pretrain", [*TINY, "model.kwargs={depth: 2, embed_dim: 48, in_chans: 3}"])
    assert build_mae(cfg, in_chans=1, img_size=None).in_chans == 3
    assert build_mae(load_config("demo/mae_pretrain", TINY), in_chans=1, img_size=None).in_chans == 1


@pytest.mark.parametrize(
    "args,needle",
    [
        (["mae.mask_ratio=1.0"], "mae.mask_ratio: must be > 0 and < 1"),
        (["mae.mask_ratio=0"], "mae.mask_ratio: must be > 0 and < 1"),  # no patch masked: a loss of 0
        (
            [*TINY, "mae.mask_ratio=0.99"],
            "mae.mask_ratio=0.99 keeps none of the encoder's 49 patches (MAE keeps",
        ),
        (["teacher.spec=vit_base_patch16_224.mae"], "it learns from pixels alone; attention transfer from"),
        (["teacher.dtype=fp32"], "pretrain does not read teacher.dtype='fp32' (it has no teacher; precision"),
        (["mae.mask_rato=0.5"], "did you mean 'mae.mask_ratio'"),
        (["model.kwargs={embed_dim: 50}"], "cannot be built with model.kwargs {'embed_dim': 50}"),
        (
            ["model.attention=relu_linear"],
            "pretrain does not read model.attention='relu_linear' (the encoder keeps",
        ),
        # keys a train run reads and pretraining would silently drop
        (
            ["ema.decay=0.9", "model.num_classes=10", "aug.mixup=0.8"],
            "pretrain does not read model.num_classes=10 (the encoder is exported headless; a head is "
            "fine-tuning's (`attnxfer train`, model.init)); ema.decay=0.9 (MAE pre-trains without an EMA of its "
            "weights); aug.mixup=0.8 (MAE's loss reads no label): remove them",
        ),
        # a smoothing of labels it never reads (0, which MAE's recipe writes, is allowed: the test below)
        (
            ["aug.label_smoothing=0.2"],
            "pretrain does not read aug.label_smoothing=0.2 (MAE's loss reads no label)",
        ),
        # a section it reads no key of, refused whole (its config.yaml leaves it out; mode=none, what it does, allowed)
        (["transfer.mode=copy"], "transfer.mode: attnxfer pretrain does not read the transfer section and"),
        (["model.name=swin_tiny_patch4_window7_224"], "needs a plain ViT (timm's VisionTransformer"),
        (  # MAE's fixed sin-cos positions: sin and cos of rows and of columns
            [*TINY, "model.kwargs={depth: 2, embed_dim: 54, num_heads: 3}"],
            "need an encoder width divisible by 4, got 54: make model.kwargs.embed_dim a multiple of 4",
        ),
        # the encoder is built and exported with MAE's class-token pooling whatever these say
        (
            ["model.global_pool=avg", "model.fc_norm=true", *TINY],
            "pretrain does not read model.global_pool='avg' (the pooling is fine-tuning's",
        ),
        # model.kwargs.in_chans is the encoder's, as train's student's: a data.in_chans against it is refused
        (
            ["model.kwargs={depth: 2, embed_dim: 48, in_chans: 3}", "data.in_chans=1"],
            "data.in_chans=1, but the encoder takes 3-channel images (model.kwargs.in_chans): drop data.in_chans",
        ),
        # no head to score: refused at the start, as `attnxfer eval` of the run would refuse it
        (
            ["eval.metrics=[top1]", *TINY],  # tiny: a regression costs seconds, not a whole pre-training
            "no task loss (MAE pre-training), so no head was trained to score; drop top1 from eval.metrics (knn "
            "needs no head)",
        ),
        (  # MAE has no teacher to compare features with: refused at the start, not by a later eval
            ["eval.metrics=[features]", *TINY],
            "eval.metrics=features compares the student's final features with its teacher's, and this run has "
            "no teacher (teacher.spec); drop features from eval.metrics",
        ),
    ],
)
def test_bad_pretrain_input_is_one_clear_message(args, needle, tmp_path, capsys):
    """Through the CLI's own main, in this process (the real process: the test below)."""
    code, _, err = run_cli(capsys, "pretrain", "-c", "demo/mae_pretrain", f"run_dir={tmp_path}", *args)
    assert code == 2, err[-2000:]
    assert needle in err and "Traceback" not in err


def test_no_label_smoothing_as_mae_vit_base_writes_it_is_not_refused():
    """Its recipe says aug.label_smoothing: 0.0 ('labels are not read'): that is what pre-training does."""
    from attnxfer.apps.run.pretrain import refuse_unread_keys

    refuse_unread_keys(load_config("pretrain/mae_vit_base"))
    with pytest.raises(InputError, match=r"aug.label_smoothing=0.05 \(MAE's loss reads no label\)"):
        refuse_unread_keys(load_config("pretrain/mae_vit_base", ["aug.label_smoothing=0.05"]))


@pytest.mark.slow
def test_a_refused_pretrain_exits_2_with_one_line_in_a_real_process(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "attnxfer",
            "pretrain",
            "-c",
            "demo/mae_pretrain",
            f"run_dir={tmp_path}",
            "mae.mask_ratio=1.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "mae.mask_ratio: must be > 0 and < 1" in res.stderr and "Traceback" not in res.stderr


# -- the demo's MAE rows ---------------------------------------------------------------------------
def test_demo_has_the_papers_rows_with_one_student_budget(tmp_path):
    from attnxfer.apps.demo import ROWS, TEACHERS, _keyed

    mae_rows = [r for r in ROWS if r.table in (None, "mae")]
    assert [r.key for r in mae_rows] == ["scratch", "mae_finetune", "copy", "distill"]
    assert TEACHERS["mae"].recipe == "demo/mae_pretrain"
    cfgs = [_keyed(tmp_path, r.key, r.recipe, []) for r in mae_rows]
    # the same student architecture, data and step budget in every row
    budget = {
        (c.model.name, c.data.batch_size, c.schedule.epochs, c.schedule.max_steps, c.seed) for c in cfgs
    }
    assert len(budget) == 1
    assert [c.transfer.mode for c in cfgs] == ["none", "none", "copy", "distill"]
    assert cfgs[1].model.init and not cfgs[0].model.init
    # run folders are keyed by the config: same config, same folder; any change, another folder
    again = _keyed(tmp_path, "copy", "demo/copy", [])
    other = _keyed(tmp_path, "copy", "demo/copy", ["teacher.spec=local-dir:/elsewhere"])
    assert again.run_dir == cfgs[2].run_dir != other.run_dir
    assert _keyed(tmp_path, "copy", "demo/copy", ["log.progress=false"]).run_dir == again.run_dir


def test_every_demo_table_compares_its_copy_and_distillation_rows_with_each_other_and_with_scratch():
    """The supervised table once printed an empty comparison table: its rows have their own keys."""
    from attnxfer.apps.demo import TABLES, table_pairs

    assert table_pairs("mae") == [
        ("copy", "distill"),
        ("copy", "scratch"),
        ("distill", "scratch"),
        ("copy", "mae_finetune"),
    ]
    assert table_pairs("supervised") == [
        ("sup_copy", "sup_distill"),
        ("sup_copy", "scratch"),
        ("sup_distill", "scratch"),
    ]
    assert set(TABLES) == {"mae", "supervised"}
    assert table_pairs("supervised", keys=["scratch", "sup_copy"]) == [("sup_copy", "scratch")]


def test_demo_budget_of_zero_steps_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--budget-steps", "0"])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_the_demo_leaves_its_teacher_at_one_path_and_replaces_it_only_for_another_teacher(tmp_path, capsys):
    """`runs/demo/mae/export` is what the recipes and the docs name: real files (not a link to a hashed run
    folder, which a new teacher would leave behind), the same teacher kept as it is, another one replacing it
    whole and said so."""
    from attnxfer.apps.demo import publish_export
    from attnxfer.checkpoints.atomic_io import current_umask
    from attnxfer.run_layout import DEMO_EXPORTS

    assert DEMO_EXPORTS["mae"] == "mae/export"

    def export(name: str, text: str) -> Path:
        folder = tmp_path / name / "export"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(text)
        (folder / "model.safetensors").write_bytes(text.encode())
        (folder / "attnxfer_source.json").write_text('{"config_digest": "its own stamp"}')
        return folder

    stable = tmp_path / "demo" / "mae" / "export"
    first = {"config_digest": "a" * 16, "run_dir": str(tmp_path / "mae-aaaa")}
    assert publish_export(export("mae-aaaa", "first"), stable, first) == stable
    assert (stable / "config.json").read_text() == "first" and not stable.is_symlink()
    assert json.loads((stable / "attnxfer_source.json").read_text()) == first
    assert oct(stable.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())  # readable as any folder
    inode = (stable / "model.safetensors").stat().st_ino
    publish_export(tmp_path / "mae-aaaa" / "export", stable, first)
    assert (stable / "model.safetensors").stat().st_ino == inode  # the same teacher: nothing copied
    assert "replacing" not in capsys.readouterr().out

    second = {"config_digest": "b" * 16, "run_dir": str(tmp_path / "mae-bbbb")}
    publish_export(export("mae-bbbb", "second"), stable, second)
    assert (stable / "config.json").read_text() == "second"
    assert (
        f"replacing the export of {first['run_dir']} with the export of {second['run_dir']}"
        in capsys.readouterr().out
    )
    assert sorted(p.name for p in stable.parent.iterdir()) == ["export"]  # no staging or old folder left
    # `attnxfer pretrain -c demo/mae_pretrain` exports there too, keeping the demo's stamp: the weights decide
    (stable / "model.safetensors").write_bytes(b"a pretrain's own")
    publish_export(tmp_path / "mae-bbbb" / "export", stable, second)
    assert (stable / "model.safetensors").read_bytes() == b"second"
    assert "replacing a teacher made otherwise" in capsys.readouterr().out
    assert (tmp_path / "mae-aaaa" / "export" / "config.json").read_text() == "first"  # the hashed one stays


def test_the_demo_keeps_a_pretrain_export_it_replaces_beside_its_own(tmp_path, capsys):
    """`attnxfer pretrain -c demo/mae_pretrain` exports runs/demo/mae/export, the teacher of runs trained from
    it (checked by hash on resume). The demo publishing its own teacher there deleted that export; it is kept
    beside the new one, as pretrain keeps an export it replaces. The demo's own earlier teacher stays only in
    its cache folder."""
    from attnxfer.apps.demo import publish_export

    stable = tmp_path / "runs" / "demo" / "mae" / "export"
    stable.mkdir(parents=True)
    (stable / "config.json").write_text("the pretrain's")
    (stable / "model.safetensors").write_bytes(b"the pretrain's weights")
    ours = tmp_path / "mae-aaaa" / "export"
    ours.mkdir(parents=True)
    (ours / "config.json").write_text("the demo's")
    (ours / "model.safetensors").write_bytes(b"the demo's weights")
    publish_export(ours, stable, {"config_digest": "a" * 16, "run_dir": str(ours.parent)})
    assert (stable / "model.safetensors").read_bytes() == b"the demo's weights"
    (kept,) = stable.parent.glob("export.replaced-*")
    assert (kept / "model.safetensors").read_bytes() == b"the pretrain's weights"
    assert f"kept the teacher it replaces as {kept}" in capsys.readouterr().out


def test_the_demo_goes_on_in_runs_demo_after_a_demo_recipe_ran_there(tmp_path, monkeypatch, capsys):
    """`attnxfer pretrain -c demo/mae_pretrain` (or `train -c demo/copy`) writes runs/demo/mae (runs/demo/copy):
    `attnxfer demo` then refused its own folder as "other work", where it replaces that export and says so.
    Another folder holding other work is still refused (tests/cli/test_user_errors.py)."""
    from attnxfer.apps import demo

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "_build_teacher", stop)
    (tmp_path / "runs" / "demo" / "mae" / "export").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "mae" / "run.json").write_text("{}")
    with pytest.raises(Reached):
        demo.run_demo(quick=True)
    # its runs' short-run warnings tell the user to raise schedule.max_steps, a key the demo set: said first
    assert "[demo] --quick: a smoke test of 60 teacher and 30 student steps" in capsys.readouterr().out
    (tmp_path / "mine" / "mae").mkdir(parents=True)
    code, _, err = run_cli(capsys, "demo", "--quick", "--out", "mine")
    assert code == 2 and "holds other work (mae) and no demo's runs" in err


def test_a_moved_demo_names_its_runs_where_they_are_now(tmp_path):
    """A demo folder copied or moved keeps result.json's old run_dir: the demo then said "the MAE teacher is
    cached in OLD (...) delete that folder to pre-train again", a folder that is not this demo's."""
    from attnxfer.apps.demo import ROWS, _digest, _keyed, _run, _Students

    cfg = _keyed(tmp_path, "mae", "demo/mae_pretrain", [])
    moved = {"config_digest": _digest(cfg), "run_dir": "/elsewhere/mae-x", "val": 0.5}
    Path(cfg.run_dir).mkdir()
    (Path(cfg.run_dir) / "result.json").write_text(json.dumps(moved))
    assert _run(cfg, "teacher", trainer=None)["run_dir"] == cfg.run_dir
    row = ROWS[0]
    student = _keyed(tmp_path, row.key, row.recipe, [])
    Path(student.run_dir).mkdir()
    (Path(student.run_dir) / "val_correct.json").write_text(
        json.dumps({"config_digest": "d", "correct": [1]})
    )
    students = _Students(runs_by_table={"mae": {}})
    students.add(row, student, {"config_digest": "d", "run_dir": "/elsewhere/scratch-x"}, 0)
    assert students.results[row.key][0]["run_dir"] == student.run_dir
