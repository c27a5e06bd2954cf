"""Config values a registry holds are checked as the config loads, from names read without torch; these tests
hold those names equal to the registries' own (tests/cli/test_cli_startup.py runs the refusals through the CLI
and checks that they import no torch)."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from torch import nn

import attnxfer
from attnxfer.config import ConfigError, TrainConfig, load_config
from attnxfer.config.keys import leaves
from attnxfer.launch import value_checks
from attnxfer.launch.value_checks import check_values, is_architecture
from attnxfer.models.attention import registry
from attnxfer.train.trackers import TRACKERS
from attnxfer.transfer.comparisons import COMPARISON_LOSSES
from attnxfer.transfer.map_losses import MapLoss
from attnxfer.transfer.modes import MODES


def test_the_schema_offers_exactly_the_transfer_modes_the_trackers_and_the_map_losses():
    """The config's choices are written out (it imports no torch): a mode, tracker or map loss added to its
    table alone would be refused as the config loads."""
    rules = {leaf.name: leaf.range for leaf in leaves(TrainConfig)}
    assert rules["transfer.mode"].choices == tuple(MODES)
    assert rules["log.trackers"].choices == tuple(TRACKERS)
    assert rules["convert.map_loss"].choices == tuple(MapLoss)


def test_attention_names_read_from_the_source_are_the_registrys():
    names, prefixes, unread = value_checks._registered_by_text()
    assert not unread  # every built-in name is read from the source: a typo's refusal imports no torch
    assert names == set(registry._ATTENTIONS) and prefixes == set(registry._PARAMETRIC)
    assert {"softmax", "performer", "hedgehog"} <= names and prefixes == {"formula"}


@pytest.mark.parametrize(
    "overrides,refusal",
    [
        (
            ["model.attention=perfromer"],
            "model.attention: 'perfromer' is not a registered attention; did you mean",
        ),
        (["model.attention=[softmax,softmaks]"], "model.attention[1]: 'softmaks'"),
        (["convert.attention=[hedgehog,Hedgehog]"], "convert.attention[1]: 'Hedgehog'"),
        (  # a misspelt prefix: the suggestion replaces it rather than adding another
            ["convert.attention=formulas:sum(relu)"],
            "convert.attention: 'formulas:sum(relu)' is not a registered attention; a formula is named with its "
            "prefix: did you mean 'formula:sum(relu)'?",
        ),
        (  # convert.attention's own value beside the registry's names
            ["convert.attention=atuo", "convert.speedup=2"],
            "convert.attention: 'atuo' is not a registered attention; did you mean 'auto'? (one of agent, auto, ",
        ),
        (  # the wrong case: suggested, not taken
            ["convert.attention=AUTO", "convert.speedup=2"],
            "convert.attention: 'AUTO' is not a registered attention; did you mean 'auto'? (one of agent, auto, ",
        ),
        (
            ["model.attention=[softmax,HEDGEHOG]"],
            "model.attention[1]: 'HEDGEHOG' is not a registered attention; did you mean 'hedgehog'?",
        ),
        (  # a formula without its prefix, wherever an attention is named: the formula spelling suggested
            ["convert.candidates=[hedgehog,len(elu1)]"],
            "convert.candidates[1]: 'len(elu1)' is not a registered attention; a formula is named with its "
            "prefix: did you mean 'formula:len(elu1)'?",
        ),
    ],
)
def test_an_unknown_attention_name_is_refused_naming_the_key_and_the_choices(overrides, refusal):
    with pytest.raises(ConfigError, match="one of agent, ") as e:
        check_values(load_config(None, overrides))
    assert str(e.value).startswith(refusal) and "formula:<spec>" in str(e.value)


def test_a_formula_split_at_its_commas_in_a_list_is_refused_saying_to_quote_it():
    """YAML splits [formula:sum(proj.cat(softmax,neg.softmax)),relu_linear] at the comma inside cat(...): the
    refusal says to quote the formula, not that 'neg.softmax))' is no attention (did you mean 'softmax'?)."""
    for key in ("convert.attention", "model.attention", "convert.candidates", "search.seeds"):
        with pytest.raises(ConfigError) as e:
            check_values(
                load_config(None, [f"{key}=[formula:sum(proj.cat(softmax,neg.softmax)),relu_linear]"])
            )
        assert str(e.value).startswith(
            f"{key}: ['formula:sum(proj.cat(softmax', 'neg.softmax))', 'relu_linear']"
        )
        assert "a formula was split at a comma inside it" in str(e.value) and "quote each formula" in str(
            e.value
        )
    quoted = "convert.attention=['formula:sum(proj.cat(softmax,neg.softmax))',relu_linear]"
    assert check_values(load_config(None, [quoted])).convert.attention[1] == "relu_linear"


@pytest.mark.parametrize("key", ["convert.attention", "convert.candidates", "search.seeds"])
def test_a_formula_missing_its_closing_parenthesis_in_a_list_is_not_said_to_be_split(key):
    """['formula:sum(relu'] has no comma to split at: its parse names the missing ')', not YAML's commas."""
    try:
        check_values(load_config(None, [f"{key}=[relu_linear,'formula:sum(relu']"]))
    except ConfigError as e:
        assert "split at a comma" not in str(e)


def test_registered_names_a_parametric_name_and_an_own_registration_pass():
    ok = ["model.attention=[softmax,performer]", "convert.attention=formula:sum(relu)"]
    assert check_values(load_config(None, ok)).model.attention == ["softmax", "performer"]

    @registry.register_attention("test_value_checks_own")
    class Own(nn.Module):
        pass

    try:  # a session's own attention is a name once registered: the imported registry is asked
        check_values(load_config(None, ["model.attention=test_value_checks_own"]))
    finally:
        del registry._ATTENTIONS["test_value_checks_own"]
    with pytest.raises(ConfigError, match="test_value_checks_own"):
        check_values(load_config(None, ["model.attention=test_value_checks_own"]))


@pytest.mark.parametrize(
    "recipe,overrides,key",
    [
        # a recipe's options for its own attention, left behind when the command line names another
        ("convert/demo_hedgehog", ["convert.attention=formula:sum(relu)"], "convert.attention_kwargs"),
        (
            "convert/demo_hedgehog",
            ["convert.attention=auto", "convert.candidates=[relu_linear]"],
            "convert.attention_kwargs",
        ),
        (
            "demo/distill",
            ["model.attention=relu_linear", "model.attention_kwargs={feature_dim: 8}"],
            "model.attention_kwargs",
        ),
    ],
)
def test_options_no_named_attention_takes_are_refused_as_the_config_loads(recipe, overrides, key):
    with pytest.raises(ConfigError, match=r"accepts option\(s\) \['feature_dim'\]") as e:
        check_values(load_config(recipe, overrides))
    assert str(e.value).startswith(f"{key}: ") and "set the key to {}" in str(e.value)
    # dropped, or taken by one of the attentions named (auto: its candidates): the config loads
    check_values(load_config(recipe, [*overrides, f"{key}={{}}"]))
    auto_with_hedgehog = ["convert.attention=auto", "convert.candidates=[relu_linear,hedgehog]"]
    assert check_values(load_config("convert/demo_hedgehog", auto_with_hedgehog)).convert.attention_kwargs


def test_an_option_an_attention_has_no_default_for_is_refused_as_the_config_loads(monkeypatch):
    """Not given, it was Python's "missing 1 required keyword-only argument" as the student was built: the
    refusal names the attention, the option and the key to set it in, and given, the config loads."""
    from attnxfer.models.efficient.linear import ReLULinearAttention

    monkeypatch.setattr(registry, "_ATTENTIONS", dict(registry._ATTENTIONS))

    @registry.register_attention("test_needs_rank")
    class NeedsRank(ReLULinearAttention):
        # seq_len too, never asked of the user: the swap gives it the model's token count (a Linformer-like plug-in)
        def __init__(self, dim: int, num_heads: int = 8, *, rank: int, seq_len: int, **kwargs) -> None:
            super().__init__(dim, num_heads, **kwargs)
            self.rank, self.seq_len = rank, seq_len

    for overrides in (["convert.attention=test_needs_rank"], ["model.attention=[softmax,test_needs_rank]"]):
        with pytest.raises(ConfigError) as e:
            check_values(load_config(None, overrides))
        key = overrides[0].split(".")[0] + ".attention_kwargs"
        assert str(e.value) == (
            f"{key}: test_needs_rank has no default for its option(s) ['rank']: set them in the key, e.g. "
            "{rank: ...}"
        )
    given = ["convert.attention=test_needs_rank", "convert.attention_kwargs={rank: 4}"]
    assert check_values(load_config(None, given)).convert.attention_kwargs == {"rank": 4}


def test_the_zoos_attentions_have_a_default_for_every_option():
    """What lets the check above skip torch for a name read from the source when no options are given."""
    import attnxfer.models.efficient  # noqa: F401  (registers the zoo)
    from attnxfer.models.efficient.swap import _parameter

    assert {"performer", "hedgehog", "softmax"} <= set(registry._ATTENTIONS)
    for name, cls in registry._ATTENTIONS.items():
        if cls.__module__.startswith("attnxfer."):
            assert not [
                o for o in cls.own_options() if _parameter(cls, o).default is inspect.Parameter.empty
            ], name


def test_architecture_names_read_from_the_source_are_timms():
    """Every architecture timm lists (attnxfer's micro models among them) and every deprecated alias timm
    still builds, read from the files without importing timm."""
    import attnxfer.models  # noqa: F401  (registers attnxfer's micro models with timm)

    read = value_checks._timm_names() | value_checks._model_names(value_checks._MODELS)
    assert read == set(timm.list_models()) | set(timm.models._registry._deprecated_models)
    assert is_architecture("vit_base_patch16_224.mae") and is_architecture("vit_tiny_patch16_224_in21k")
    assert is_architecture("vit_micro_patch4_28") and is_architecture("vit_mirco_patch4_28") is False


@pytest.mark.parametrize("key", ["model.name", "teacher.arch"])
def test_an_unknown_architecture_is_refused_with_the_nearest(key):
    with pytest.raises(
        ConfigError, match=f"^{key}: 'vit_base_patch16_244.mae' is not a timm architecture; did"
    ):
        check_values(load_config(None, [f"{key}=vit_base_patch16_244.mae"]))
    check_values(load_config(None, [f"{key}=hf-hub:acme/any"]))  # resolved where the model is built


@pytest.mark.parametrize(
    "policy, timm_reads",
    [
        ("rand-m9-mstd0.5-inc1", "builds"),
        ("rand-n3-m7-tweights", "builds"),
        ("augmix-m5-w4-d2-a1.0-b1", "builds"),
        ("original-mstd0.5", "builds"),
        ("3a", "builds"),
        ("rand-m9-incx", "ignores 'incx'"),  # no digit: timm passes over it
        ("rand-m9-q5", "asserts"),
        ("rand-m9.5", "raises"),
        ("v1", "asserts"),
    ],
)
def test_auto_augment_policies_are_read_as_timm_reads_them_and_what_it_would_ignore_is_refused(
    policy, timm_reads
):
    from timm.data import create_transform

    cfg = load_config(None, [f"aug.auto_augment={policy}"])
    if timm_reads == "builds":
        check_values(cfg)
        assert create_transform(32, is_training=True, auto_augment=policy) is not None
        return
    with pytest.raises(ConfigError, match=f"^aug.auto_augment={policy}: "):
        check_values(cfg)
    if timm_reads == "ignores 'incx'":
        assert repr(create_transform(32, is_training=True, auto_augment=policy)) == repr(
            create_transform(32, is_training=True, auto_augment="rand-m9")
        )
    else:
        with pytest.raises((AssertionError, ValueError)):
            create_transform(32, is_training=True, auto_augment=policy)


def test_comparison_loss_names_read_from_the_source_are_the_registrys():
    # the package's own entries (a test elsewhere registers one of its own in this process)
    own = {name for name, fn in COMPARISON_LOSSES.items() if fn.__module__.startswith("attnxfer.")}
    names, unread = value_checks._comparisons_by_text()
    assert names == own >= {"map", "mse", "logit_kd"} and not unread
    with pytest.raises(
        ConfigError,
        match=r"^transfer.losses\[1\].name: 'logit_kdd' is not a comparison loss; did.* @comparison_loss in a "
        r"file of attnxfer/transfer/ or in a module named by an 'attnxfer.losses' entry point\)$",
    ):
        check_values(load_config(None, ["transfer.losses=[{name: mse, signal: v}, {name: logit_kdd}]"]))
    check_values(load_config(None, ["transfer.losses=[{name: feature_distill, weight: 0.5}]"]))


def test_a_forks_attention_named_in_single_quotes_is_read_from_the_source():
    """As Python registers ``@register_attention('elu_linear')``, directly or through a constant."""
    text = "NAME = 'elu_plus'\n@register_attention('elu_linear')\n@register_attention(NAME)\n"
    assert value_checks._CALL.findall(text) == [("", "elu_linear", ""), ("", "", "NAME")]
    assert value_checks._constants(text) == {"NAME": "elu_plus"}


def test_a_forks_attention_named_by_keyword_is_read_from_the_source():
    """Python registers ``@register_attention(name="x")`` (and a parametric ``prefix="x:"``) as it does the
    bare literal: the CLI's check must not refuse that attention as unknown."""
    text = '@register_attention(name="elu_linear")\nregister_parametric_attention(prefix="lowrank:", resolve=f)\n'
    assert value_checks._CALL.findall(text) == [("", "elu_linear", ""), ("parametric_", "lowrank:", "")]


_COMMENTED = '''"""Attentions of a fork. Register your own as this module does::

    @register_attention("doc_example")
    register_parametric_attention(prefix="doc_prefix:", resolve=f)
"""
NAME = 'elu_plus'

# @register_attention("retired")
@register_attention("elu_linear")  # was register_attention('old_name')
@register_attention(NAME)
class EluLinear:
    \'\'\'Not register_attention("in_a_docstring") here.\'\'\'

    note = "it's register_attention('in_a_string') and \\" register_attention('after_an_escape')"
'''


def test_a_registration_in_a_comment_or_a_string_is_not_read_as_one(tmp_path, monkeypatch):
    """A docstring's example or a registration commented out registers nothing when Python imports the file:
    read as a registration, its name passed the check as the config loaded and failed once the model was built."""
    (tmp_path / "attention").mkdir()
    (tmp_path / "efficient").mkdir()
    (tmp_path / "attention" / "softmax.py").write_text('@register_attention("softmax")\n')
    (tmp_path / "efficient" / "fork.py").write_text(_COMMENTED)
    monkeypatch.setattr(value_checks, "_MODELS", tmp_path)
    value_checks._registered_by_text.cache_clear()
    try:
        read = value_checks._registered_by_text()
    finally:
        value_checks._registered_by_text.cache_clear()
    assert read == ({"softmax", "elu_linear", "elu_plus"}, set(), False)


_NAMED_BY_CODE = """
import torch

from ..attention.registry import register_attention
from .kernels import ALL_HEADS, KernelAttention

for _kernel in ("sigmoid", "softplus"):

    class _Fixed(KernelAttention):
        def query_features(self, q, heads=ALL_HEADS, _f=getattr(torch.nn.functional, _kernel)):
            return _f(q)

        key_features = query_features

    register_attention(f"{_kernel}_linear")(_Fixed)
"""


@pytest.mark.slow
def test_a_forks_attention_named_by_code_is_not_refused_as_unknown(tmp_path):
    """A fork's file registering its names in a loop (``register_attention(f"{kernel}_linear")``), which the
    source cannot be read for: the check asks the imported zoo before it says 'not a registered attention'."""
    child = _checked_in_fork(
        tmp_path,
        "models/efficient/fixed_linear.py",
        _NAMED_BY_CODE,
        "['model.attention=sigmoid_linear', 'convert.attention=softplus_linear']",
    )
    assert child.returncode == 0, child.stderr


def _checked_in_fork(tmp_path: Path, file: str, source: str, overrides: str) -> subprocess.CompletedProcess:
    """The CLI's value checks of ``overrides`` run in a copy of the package with ``source`` added as ``file``."""
    fork = tmp_path / "fork"
    shutil.copytree(
        Path(attnxfer.__file__).parent, fork / "attnxfer", ignore=shutil.ignore_patterns("__pycache__")
    )
    (fork / "attnxfer" / file).write_text(source)
    check = (
        "from attnxfer.config import load_config; from attnxfer.launch.value_checks import check_values; "
        f"check_values(load_config(None, {overrides}))"
    )
    env = {**os.environ, "PYTHONPATH": str(fork)}
    return subprocess.run([sys.executable, "-c", check], cwd=fork, env=env, capture_output=True, text=True)


def test_a_forks_loss_named_in_single_quotes_is_read_from_the_source():
    """A forked file need not be ruff-formatted: Python registers ``@comparison_loss('cosine')`` as it does
    the double-quoted name, so the CLI's check reads it too (a docstring's indented example still not)."""
    text = "@comparison_loss('cosine')\nclass Cosine: ...\n    @comparison_loss('example')\n"
    assert value_checks._COMPARISON.findall(text) == [("cosine", "")]


def test_a_forks_loss_named_by_keyword_or_constant_is_read_from_the_source():
    """Python registers ``@comparison_loss(name="v_mse")`` and ``@comparison_loss(NAME)`` as it does the bare
    literal, so the CLI's check must not refuse a fork's loss written either way as 'not a comparison loss'."""
    text = 'NAME = "cos"\n@comparison_loss(name="v_mse")\n@comparison_loss( name = \'q_l1\')\n@comparison_loss(NAME)\n'
    assert value_checks._COMPARISON.findall(text) == [("v_mse", ""), ("q_l1", ""), ("", "NAME")]
    assert value_checks._constants(text) == {"NAME": "cos"}


def test_a_forks_loss_decorated_through_its_module_or_called_is_read_from_the_source():
    """``@transfer.comparison_loss("cosine")`` and ``comparison_loss("q_l1")(QL1)`` register as the bare decorator
    does, yet the CLI's check read neither and refused the fork's own loss as 'not a comparison loss'."""
    text = (
        '@transfer.comparison_loss("cosine")\n@attnxfer.transfer.comparisons.comparison_loss(name="v_mse")\n'
        'comparison_loss("q_l1")(QL1)\ndef comparison_loss(name: str): ...\n    @transfer.comparison_loss("example")\n'
    )
    assert value_checks._COMPARISON.findall(text) == [("cosine", ""), ("v_mse", ""), ("q_l1", "")]


def test_a_constant_built_by_code_is_not_read_as_its_first_piece():
    """``NAME = "attn_" + "mse"`` was read as ``"attn_"``: the fork's own name was refused, 'did you mean attn_'."""
    assert value_checks._constants('NAME = "attn_" + "mse"\nKIND = "x"  # a comment\n') == {"KIND": "x"}


_LOSSES_NAMED_BY_CODE = """
from ..models.handover import Signal
from .comparisons import ComparisonLoss, comparison_loss
from .step_loss import Loss

PREFIX = "attn_"


@comparison_loss(PREFIX + "mse")
class AttnMSE(ComparisonLoss):
    signals = (Signal.FEATURES,)

    def compare(self, comparison, student, teacher, step):
        return Loss((student - teacher).pow(2).mean())


@comparison_loss(f"{PREFIX}l1")
class AttnL1(ComparisonLoss):
    signals = (Signal.FEATURES,)

    def compare(self, comparison, student, teacher, step):
        return Loss((student - teacher).abs().mean())
"""


@pytest.mark.slow
def test_a_forks_loss_named_by_code_is_not_refused_as_unknown(tmp_path):
    """As for attentions: a name the source cannot be read for is asked of the imported registry before the
    check says 'not a comparison loss'."""
    child = _checked_in_fork(
        tmp_path,
        "transfer/attn_losses.py",
        _LOSSES_NAMED_BY_CODE,
        "['transfer.losses=[{name: attn_mse}, {name: attn_l1}]']",
    )
    assert child.returncode == 0, child.stderr


def test_a_formula_that_does_not_parse_is_named_by_its_key_when_the_registry_is_loaded():
    """With the registry imported (a plug-in's, a session's) the option check parses a formula first: its
    syntax error reached the user without the key it was given in."""
    import attnxfer.models.efficient  # noqa: F401  (the registry loaded, as in a session)

    with pytest.raises(ConfigError) as e:
        check_values(load_config(None, ["convert.attention=formula:sum(relu.)"]))
    assert str(e.value).startswith(
        "convert.attention: formula syntax error at position 17 of 'formula:sum(relu.)'"
    )


@pytest.mark.parametrize(
    "overrides,where",
    [
        (["convert.attention=[softmax, 'formula:sum(relu.)']"], "convert.attention[1]"),
        (  # auto's candidates are the names parsed: the key that lists the formula, not convert.attention
            [
                "convert.attention=auto",
                "convert.speedup=2",
                "convert.candidates=[hedgehog, 'formula:sum(relu.)']",
            ],
            "convert.candidates[1]",
        ),
    ],
)
def test_a_formula_in_a_list_that_does_not_parse_is_named_by_its_item(overrides, where):
    """A list of one name per block: the refusal says which item to fix, as an unknown name's does."""
    import attnxfer.models.efficient  # noqa: F401  (the registry loaded, as in a session)

    with pytest.raises(ConfigError) as e:
        check_values(load_config(None, overrides))
    assert str(e.value).startswith(f"{where}: formula syntax error at position 17 of 'formula:sum(relu.)'")
