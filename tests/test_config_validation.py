"""Every config key fed a wrong type, zero, a negative and an out-of-range value, through the CLI.

The table below is written from what each key means (not read from the schema): ``True`` = the value is
valid, ``False`` = one config error naming the key, exit code 2, no traceback and no file. A key added to
the schema without a row here fails `test_every_schema_key_has_a_row`.
"""

from __future__ import annotations

import pytest

from attnxfer.config import config_keys, load_config
from attnxfer.launch import cli

STR, NUM, BOOL = "[1, 2]", "abc", "maybe"  # a wrong type for strings, numbers, booleans

# key: (wrong type, zero valid?, negative valid?, out-of-range value or None)
# None for zero/negative: not a number-like key (a string takes "0" as a name, a bool refuses both)
TABLE: dict[str, tuple[str, bool | None, bool | None, str | None]] = {
    "run_dir": (STR, None, None, None),
    "seed": (NUM, True, False, str(2**32)),
    "device": (STR, False, False, "tpu"),
    "precision": (STR, False, False, "fp8"),
    "deterministic": (BOOL, False, False, None),
    "eval_only": (BOOL, False, False, None),
    "model.name": (STR, None, None, None),
    "model.num_classes": (NUM, False, False, None),
    "model.drop_path_rate": (NUM, True, False, "1.0"),
    "model.mirror_teacher": (BOOL, False, False, None),
    "model.kwargs": ("[1]", False, False, None),
    "model.global_pool": (STR, False, False, "bogus"),
    "model.fc_norm": (BOOL, False, False, None),
    "model.init": (STR, None, None, None),
    "model.attention": ("{a: 1}", None, None, None),  # a name or a list of names; the registry checks names
    "model.attention_kwargs": ("[1]", False, False, None),
    "model.compile": (BOOL, False, False, None),
    "model.compile_mode": (STR, False, False, "reduce-overhead"),  # CUDA graphs: not offered
    "teacher.spec": (STR, None, None, None),
    "teacher.arch": (STR, None, None, None),
    "teacher.revision": (STR, None, None, None),
    "teacher.cache_dir": (STR, None, None, None),
    "teacher.dtype": (STR, False, False, "bogus"),
    "teacher.compile": (BOOL, False, False, None),
    "transfer.mode": (STR, None, None, None),
    "transfer.end_layer": (NUM, True, True, None),
    "transfer.layers": ("3", False, False, "[0, -1]"),
    "transfer.atd_weight": (NUM, True, False, None),
    "transfer.share_drop_path": (BOOL, False, False, None),
    "transfer.logit_distill": (NUM, True, False, None),
    "transfer.logit_temperature": (NUM, False, False, None),
    "transfer.ce_path": (STR, False, False, "flash"),
    "transfer.materialise_budget_gib": (NUM, True, False, None),  # 0: never materialise
    "data.dataset": (STR, None, None, None),
    "data.root": (STR, None, None, None),
    "data.img_size": (NUM, False, False, None),
    "data.in_chans": (NUM, False, False, None),
    "data.mean": ("0.5", False, False, None),
    "data.std": ("0.5", False, False, "[0.5, 0]"),
    "data.batch_size": (NUM, False, False, None),
    "data.eval_batch_size": (NUM, False, False, None),
    "data.num_workers": (NUM, True, False, None),
    "data.pin_memory": (BOOL, False, False, None),
    "data.synthetic_length": (NUM, False, False, None),
    "data.kwargs": ("[1]", False, False, None),
    "aug.label_smoothing": (NUM, True, False, "1.0"),
    "aug.mixup": (NUM, True, False, None),
    "aug.cutmix": (NUM, True, False, None),
    "aug.mixup_prob": (NUM, True, False, "1.5"),
    "aug.mixup_switch_prob": (NUM, True, False, "1.5"),
    "aug.reprob": (NUM, True, False, "1.5"),
    "aug.remode": (STR, False, False, "pixels"),
    "aug.recount": (NUM, False, False, None),
    "aug.auto_augment": (STR, None, None, None),
    "optim.lr": (NUM, False, False, ".nan"),
    "optim.blr": (NUM, False, False, ".inf"),
    "optim.min_lr": (NUM, True, False, None),
    "optim.weight_decay": (NUM, True, False, None),
    "optim.layer_decay": (NUM, False, False, "1.5"),
    "optim.layer_decay_rule": (STR, False, False, "mae"),
    "optim.beta1": (NUM, True, False, "1.0"),
    "optim.beta2": (NUM, True, False, "1.0"),
    "optim.eps": (NUM, False, False, None),
    "optim.clip_grad": (NUM, False, False, None),
    "optim.accum_steps": (NUM, False, False, "1.5"),
    "schedule.epochs": (NUM, False, False, "1.5"),
    "schedule.warmup_epochs": (NUM, True, False, None),
    "schedule.max_steps": (NUM, False, False, None),
    "ema.decay": (NUM, False, False, "1.0"),
    "log.every_steps": (NUM, False, False, None),
    "log.tensorboard": (BOOL, False, False, None),
    "log.trackers": ("3", False, False, "[tensorboard, nope]"),
    "log.project": (STR, None, None, None),
    "log.progress": (BOOL, False, False, None),
    "log.attention_images": (NUM, True, False, None),
    "mae.mask_ratio": (NUM, True, False, "1.0"),
    "mae.decoder_dim": (NUM, False, False, None),
    "mae.decoder_depth": (NUM, False, False, None),
    "mae.decoder_heads": (NUM, False, False, None),
    "mae.decoder_mlp_ratio": (NUM, False, False, None),
    "mae.norm_pix": (BOOL, False, False, None),
    "mae.pictures": (NUM, True, False, None),
    "mae.export": (BOOL, False, False, None),
    "checkpoint.every_steps": (NUM, False, False, None),
    "checkpoint.every_minutes": (NUM, False, False, None),
    "checkpoint.every_epoch": (BOOL, False, False, None),
    "checkpoint.keep_last": (NUM, False, False, None),
    "checkpoint.resume": (STR, None, None, None),
    "convert.attention": ("{a: 1}", None, None, None),
    "convert.attention_kwargs": ("[1]", False, False, None),
    "convert.stage1_steps": (NUM, True, False, None),
    "convert.stage1_lr": (NUM, False, False, None),
    "convert.stage1_batch_size": (NUM, False, False, None),
    "convert.stage1_warmup_steps": (NUM, True, False, None),
    "convert.stage1_weight_decay": (NUM, True, False, None),
    "convert.stage1_clip_grad": (NUM, False, False, None),
    "convert.stage1_train": (STR, False, False, "all"),
    "convert.map_loss": (STR, False, False, "kl"),
    "convert.output_mse": (NUM, True, False, None),
    "convert.agreement_batches": (NUM, False, False, None),
    "convert.speed_batch_size": (NUM, False, False, None),
    "convert.speed_repeats": (NUM, False, False, None),
    "search.seeds": ("{a: 1}", None, None, None),
    "search.population": (NUM, False, False, "1"),
    "search.offspring": (NUM, False, False, None),
    "search.generations": (NUM, True, False, None),
    "search.crossover_prob": (NUM, True, False, "1.5"),
    "search.layers": ("3", False, False, "[0, -1]"),
    "search.fit_steps": (NUM, False, False, None),
    "search.fit_lr": (NUM, False, False, None),
    "search.fit_train": (STR, False, False, "all"),
    "search.fit_batches": (NUM, False, False, None),
    "search.held_out_images": (NUM, False, False, None),
    "search.target_tokens": (NUM, False, False, "1"),
    "search.speed": (STR, False, False, "fast"),
    "search.speed_repeats": (NUM, False, False, None),
    "search.min_speed": (NUM, True, False, None),
    "search.time_budget_min": (NUM, False, False, None),
    "search.convert_recipe": (STR, None, None, None),
}


def _cases():
    for key, (wrong, zero_ok, negative_ok, out_of_range) in TABLE.items():
        yield key, wrong, False
        if zero_ok is not None:
            yield key, "0", zero_ok
        if negative_ok is not None:
            yield key, "-1", negative_ok
        if out_of_range is not None:
            yield key, out_of_range, False


CASES = list(_cases())


def _config_file(folder, key, value):
    """A YAML config setting ``key`` (dotted) to ``value`` (YAML text): strings can be lists there."""
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{section}:\n" for i, section in enumerate(sections))
    path = folder / f"{key}={len(list(folder.iterdir()))}.yaml"
    path.write_text(f"{text}{'  ' * len(sections)}{leaf}: {value}\n")
    return path


def test_every_schema_key_has_a_row():
    assert set(config_keys()) == set(TABLE)


@pytest.mark.parametrize("key,value", [(k, v) for k, v, ok in CASES if ok], ids=str)
def test_valid_values_are_accepted(key, value, tmp_path):
    load_config(_config_file(tmp_path, key, value))
    load_config(None, [f"{key}={value}"])


def test_invalid_values_are_one_config_error_naming_the_key(tmp_path, monkeypatch, capsys):
    """One in-process CLI call per bad value, from a YAML file (the CLI's own error path, no start-up)."""
    configs, work = tmp_path / "configs", tmp_path / "work"
    configs.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    bad = [(k, v) for k, v, ok in CASES if not ok]
    assert len(bad) > 200
    for key, value in bad:
        cfg = _config_file(configs, key, value)
        code = cli.main(
            ["train", "-c", str(cfg), f"run_dir={work / 'run'}"]
            if key != "run_dir"
            else ["train", "-c", str(cfg)]
        )
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (key, value, err)
        assert len(lines) == 1 and lines[0].startswith("attnxfer train: error: "), (key, value, err)
        assert key in lines[0], (key, value, lines[0])
        assert "Traceback" not in err
        assert list(work.iterdir()) == [], (key, value)
