"""``attnxfer pretrain``: MAE pre-training of a ViT encoder, without labels (a teacher for train / demo)."""

from __future__ import annotations

from ...speak import say
from .base import add_config_args, done_line, load, register_command


@register_command(
    "pretrain",
    help="MAE pre-training of a ViT encoder on a dataset, without labels (a teacher for train/demo)",
    description="Masked-autoencoder pre-training of the model section's ViT (the mae section: mask ratio, "
    "decoder, normalised pixel loss). Checkpoints and resume as `train`; reconstructions of validation "
    "images in RUN_DIR/pictures and TensorBoard at each evaluation; the encoder is exported in timm's "
    "layout to RUN_DIR/export (use it as teacher.spec=local-dir:RUN_DIR/export).",
    arguments=add_config_args,
)
def run(args) -> int:
    cfg = load(args)
    from ...apps.run.pretrain import pretrain

    say(done_line(pretrain(cfg)))
    return 0
