"""TeacherStudent: copy identity, layer plans, the teacher as a guest, optimiser groups, clear errors."""

import copy

import pytest
import timm
import torch
from helpers import fast_cells, peaked_teacher, randomize_qkv_rows, tiny_vit

from attnxfer.models import PartialQKV
from attnxfer.models.attention import AttentionIO
from attnxfer.models.efficient import efficient_student_from_teacher
from attnxfer.train import student_param_groups
from attnxfer.transfer import PlanError, TeacherStudent, build_plan, map_layers, select_layers


def _tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer.forward_features up to the blocks, written out: the reference's input."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


class _NeverStops(AttentionIO):
    """An `AttentionIO` that ignores ``stop``: with it the teacher runs every block, as if it had no stop."""

    def __setattr__(self, name, value):
        super().__setattr__(name, False if name == "stop" else value)


@pytest.mark.parametrize(
    "layers", [None, [0], *(pytest.param(v, marks=pytest.mark.slow) for v in ([1, 3], [-1]))]
)
@pytest.mark.parametrize("end_layer", fast_cells([0, -2], (-2,)))
def test_copy_with_random_qk_in_the_copied_layers_reproduces_the_teacher(layers, end_layer):
    """A student equal to the teacher except random q/k in the copied layers reproduces the teacher."""
    teacher = tiny_vit(depth=4, qkv_bias=True).eval()
    plan_layers = select_layers(4, end_layer, layers)
    student = randomize_qkv_rows(teacher, plan_layers, "qk")
    x = torch.randn(3, 3, 32, 32)
    expected = teacher(x)
    assert not torch.allclose(student(x), expected, atol=1e-3)  # the random q/k matter on their own
    pair = TeacherStudent(
        teacher, student, build_plan(teacher, student, "copy", end_layer=end_layer, layers=layers)
    ).eval()
    torch.testing.assert_close(pair(x).logits, expected, rtol=1e-5, atol=1e-5)
    pair.train()  # also in training mode (no dropout configured), with a gradient
    out = pair(x)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert out.loss is None


@pytest.mark.parametrize("mode,chunk", [("copy_q", "q"), ("copy_k", "k"), ("copy_v", "v")])
def test_copy_q_k_or_v_ignores_the_students_own_chunk_and_reproduces_the_teacher(mode, chunk):
    teacher = tiny_vit(depth=3).eval()
    student = randomize_qkv_rows(teacher, range(3), chunk)
    x = torch.randn(2, 3, 32, 32)
    pair = TeacherStudent(teacher, student, mode=mode).eval()
    torch.testing.assert_close(pair(x).logits, teacher(x), rtol=1e-5, atol=1e-5)


def test_copy_v_uses_student_maps_on_teacher_values():
    """First principles: one layer, explicit maps: out = proj_s(softmax(q_s k_sᵀ s) v_t)."""
    teacher, student = tiny_vit(depth=1, seed=1).eval(), tiny_vit(depth=1, seed=2).eval()
    pair = TeacherStudent(teacher, student, mode="copy_v").eval()
    x = torch.randn(2, 3, 32, 32)
    t_in, s_in = teacher.blocks[0].norm1(_tokens(teacher, x)), student.blocks[0].norm1(_tokens(student, x))
    ta, sa = teacher.blocks[0].attn, student.blocks[0].attn
    q_s, k_s = sa.project(s_in, "qk").values()
    v_t = ta.project(t_in, "v")["v"]
    attn = torch.softmax(q_s @ k_s.transpose(-2, -1) * sa.scale, -1) @ v_t
    h = _tokens(student, x) + sa.proj(attn.transpose(1, 2).reshape(2, 17, 48))
    h = h + student.blocks[0].mlp(student.blocks[0].norm2(h))
    torch.testing.assert_close(pair(x).logits, student.forward_head(student.norm(h)), rtol=1e-5, atol=1e-5)


def test_end_layer_minus3_on_12_blocks_and_frozen_qk_have_no_grad_or_optimizer_slot():
    teacher, student = tiny_vit(depth=12, seed=1), tiny_vit(depth=12, seed=2)
    plan = build_plan(teacher, student, "copy", end_layer=-3)
    assert plan.student_layers == tuple(range(9))
    pair = TeacherStudent(teacher, student, plan)
    out = pair(torch.randn(2, 3, 32, 32))
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 2])).backward()
    in_groups = {id(p) for g in student_param_groups(pair, layer_decay=0.75) for p in g["params"]}
    for i, blk in enumerate(student.blocks):
        qkv = blk.attn.qkv
        if i < 9:
            assert isinstance(qkv, PartialQKV)
            for c in "qk":
                w = getattr(qkv, f"{c}_weight")
                assert not isinstance(w, torch.nn.Parameter) and w.grad is None
                assert id(w) not in in_groups
            assert qkv.v_weight.grad is not None and qkv.v_weight.grad.abs().sum() > 0
            assert id(qkv.v_weight) in in_groups
        else:
            assert isinstance(qkv, torch.nn.Linear)
            assert qkv.weight.grad.abs().sum() > 0 and id(qkv.weight) in in_groups
    # the teacher is nowhere: not in parameters, state_dict, or groups, and has no grads
    assert not any(k.startswith("teacher") for k in pair.state_dict())
    assert {id(p) for p in pair.parameters()} == {id(p) for p in student.parameters()}
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_param_groups_no_decay_and_layer_decay():
    student = tiny_vit(depth=4)
    groups = student_param_groups(student, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in student.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim <= 1 or n in ("pos_embed", "cls_token")
            assert (g["weight_decay"] == 0.0) == no_decay, n
    scales = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scales["head.weight"] == 1.0 and scales["blocks.3.attn.proj.weight"] == 0.5
    assert scales["blocks.0.mlp.fc1.weight"] == 0.5**4 and scales["patch_embed.proj.weight"] == 0.5**5


def test_distill_eval_runs_student_alone_copy_eval_runs_teacher():
    teacher, student = tiny_vit(seed=1), tiny_vit(seed=2)
    x = torch.randn(2, 3, 32, 32)
    calls = []
    teacher.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    pair = TeacherStudent(teacher, student, mode="distill").eval()
    torch.testing.assert_close(pair(x).logits, student(x))
    assert not calls
    pair.train()
    out = pair(x)
    assert calls and out.loss is not None and set(out.terms) == {f"attn_ce/{i}" for i in range(4)}
    copy_pair = TeacherStudent(tiny_vit(seed=1), tiny_vit(seed=2), mode="copy").eval()
    copy_pair.teacher.patch_embed.register_forward_hook(lambda *a: calls.append(2))
    copy_pair(x)
    assert 2 in calls


@pytest.mark.slow
def test_distill_loss_matches_per_layer_oracle_and_learns():
    teacher, student = peaked_teacher(depth=2), tiny_vit(seed=2, depth=2)
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "distill", weight=2.0)).train()
    x = torch.randn(4, 3, 32, 32)
    out = pair(x)
    from attnxfer.models import attention_maps

    t_maps, s_maps = attention_maps(teacher, x), attention_maps(student, x)
    for i in range(2):
        ce = -(t_maps[i] * s_maps[i].log()).sum(-1).mean()
        torch.testing.assert_close(out.terms[f"attn_ce/{i}"].detach(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), 2.0 * sum(out.terms.values()).detach())
    opt = torch.optim.AdamW(student_param_groups(pair), lr=3e-3)
    first_kl = sum(out.logs.values()).item()
    assert first_kl > 0.1
    for _ in range(20):
        opt.zero_grad()
        out = pair(x)
        out.loss.backward()
        opt.step()
    assert sum(out.logs.values()).item() < 0.5 * first_kl


def test_shared_drop_path_masks_keep_a_copys_maps_identical_and_private_ones_do_not():
    """Student = teacher weights with drop path: shared masks keep maps identical (KL 0), private ones don't."""
    teacher = peaked_teacher(depth=4, seed=3)
    torch.manual_seed(0)
    kl = {}
    for share in (True, False):
        student = copy.deepcopy(teacher)
        for i, blk in enumerate(student.blocks):  # timm's linear drop-path rule, as drop_path_rate=0.5 gives
            blk.drop_path1 = blk.drop_path2 = timm.layers.DropPath(0.5 * i / 3)
        pair = TeacherStudent(
            copy.deepcopy(teacher), student, build_plan(teacher, student, "distill", share_drop_path=share)
        ).train()
        out = pair(torch.randn(16, 3, 32, 32))
        kl[share] = max(v.abs().item() for v in out.logs.values())
    assert kl[True] < 1e-5 < 1e-3 < kl[False]


def test_uniform_layer_mapping_for_different_depths():
    assert map_layers(range(6), 6, 12) == ((0, 0), (1, 2), (2, 4), (3, 7), (4, 9), (5, 11))
    assert map_layers(range(4), 4, 4) == tuple((i, i) for i in range(4))
    teacher, student = tiny_vit(depth=6, seed=1), tiny_vit(depth=3, seed=2)
    plan = build_plan(teacher, student, "distill")
    assert plan.pairs == ((0, 0), (1, 2), (2, 5))
    out = TeacherStudent(teacher, student, plan).train()(torch.randn(2, 3, 32, 32))
    assert set(out.terms) == {"attn_ce/0", "attn_ce/1", "attn_ce/2"}


def test_a_pair_or_plan_that_cannot_work_is_refused_at_construction_naming_what_to_change():
    t = tiny_vit(seed=1)
    with pytest.raises(PlanError, match="token grids differ.*img_size"):
        build_plan(t, tiny_vit(img_size=48), "copy")
    with pytest.raises(PlanError, match="equal head counts.*num_heads=3"):
        build_plan(t, tiny_vit(num_heads=4, embed_dim=48), "copy")
    with pytest.raises(PlanError, match="whole multiple"):
        build_plan(tiny_vit(num_heads=4, embed_dim=48), tiny_vit(num_heads=3), "distill")
    with pytest.raises(PlanError, match="unknown transfer mode 'copyy'.*copy, copy_q"):
        build_plan(t, tiny_vit(), "copyy")
    with pytest.raises(
        PlanError, match=r"transfer\.end_layer=-4 selects no layers of the student's 4 blocks"
    ):
        build_plan(t, tiny_vit(), "copy", end_layer=-4)
    with pytest.raises(
        PlanError, match=r"transfer\.end_layer=5 asks for more layers than the student's 4 blocks"
    ):
        build_plan(t, tiny_vit(), "copy", end_layer=5)  # it selects them all and more, not none
    with pytest.raises(PlanError, match=r"transfer\.layers: layer 7 is outside"):
        build_plan(t, tiny_vit(), "copy", layers=[7])
    with pytest.raises(PlanError, match=r"transfer\.layers=\[\] names no layer to transfer"):
        build_plan(t, tiny_vit(), "distill", layers=[])  # a distillation that distils nothing
    with pytest.raises(TypeError, match="the second argument is the teacher's hand-over, got Tensor"):
        TeacherStudent(t, tiny_vit(seed=2), build_plan(t, tiny_vit(seed=2), "distill"))(
            torch.randn(2, 3, 32, 32),
            torch.tensor([1, 2]),  # (images, labels), as a task loss is called
        )
    deep = tiny_vit(depth=6, seed=3)  # a plan built for a deeper pair, handed to a shallower one
    with pytest.raises(PlanError, match="built for other models; build_plan"):
        TeacherStudent(t, tiny_vit(seed=2), build_plan(deep, tiny_vit(depth=6, seed=4), "distill"))
    # one built for a shallower student (its layers paired over 2 blocks) or other heads, handed to this pair
    for student in (tiny_vit(depth=2, seed=4), tiny_vit(num_heads=1, seed=4)):
        with pytest.raises(PlanError, match="built for other models; build_plan"):
            TeacherStudent(t, tiny_vit(seed=2), build_plan(t, student, "distill"))
    # one built for a deeper teacher pairs the student's layers with other teacher layers than this one's
    with pytest.raises(PlanError, match="teacher of 6 blocks .* this teacher 4 blocks"):
        TeacherStudent(t, tiny_vit(depth=2, seed=2), build_plan(deep, tiny_vit(depth=2, seed=2), "distill"))
    # without a teacher (a distilled student scored alone), the teacher's side of the plan is not asked for
    alone = TeacherStudent(None, tiny_vit(seed=2), build_plan(t, tiny_vit(seed=2), "distill")).eval()
    assert alone(torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)
    # a multiple of heads is fine for distillation, and averaged in groups
    plan = build_plan(tiny_vit(num_heads=6, embed_dim=48), tiny_vit(num_heads=3), "distill")
    assert "groups of 2" in plan.describe()
    # whether the student needs its teacher at inference, not whether the teacher is in eval() mode (always)
    assert "the teacher at inference: not needed" in plan.describe()
    assert "the teacher at inference: needed" in build_plan(t, tiny_vit(), "copy").describe()


def test_a_models_name_where_the_model_belongs_says_to_build_it_first():
    t = tiny_vit(seed=1)
    for call in (
        lambda: build_plan(t, "vit_tiny_patch16_224", "distill"),
        lambda: TeacherStudent("vit_tiny_patch16_224", tiny_vit(seed=2)),
        lambda: student_param_groups("vit_tiny_patch16_224"),
    ):
        with pytest.raises((TypeError, PlanError), match=r"got str 'vit_tiny_patch16_224': build it first"):
            call()


def test_one_model_as_both_teacher_and_student_is_refused_not_frozen():
    model = tiny_vit(seed=1)
    with pytest.raises(ValueError, match=r"one model: give the student its own, e\.g\. copy\.deepcopy"):
        TeacherStudent(model, model)
    assert all(p.requires_grad for p in model.parameters())  # the refusal came before the teacher's freeze


def test_a_mode_name_as_the_plan_or_a_dtype_name_says_what_to_pass():
    with pytest.raises(TypeError, match=r"plan is a str \('distill'\).*mode=\.\.\. by keyword"):
        TeacherStudent(tiny_vit(seed=1), tiny_vit(seed=2), "distill")
    with pytest.raises(TypeError, match=r"teacher_dtype: a torch.dtype \(torch.bfloat16\)"):
        TeacherStudent(tiny_vit(seed=1), tiny_vit(seed=2), teacher_dtype="bfloat16")  # config's spelling


def test_layers_or_end_layer_of_the_wrong_type_say_what_to_write():
    t = tiny_vit(seed=1)
    with pytest.raises(PlanError, match=r"transfer\.layers=1: a list of block indices"):
        build_plan(t, tiny_vit(seed=2), "distill", layers=1)  # one layer, not in a list
    with pytest.raises(PlanError, match=r"transfer\.layers='0,1': a list of block indices"):
        build_plan(t, tiny_vit(seed=2), "distill", layers="0,1")
    with pytest.raises(PlanError, match=r"transfer\.end_layer='3': an int"):
        build_plan(t, tiny_vit(seed=2), "distill", end_layer="3")


def test_an_unknown_ce_path_names_the_paths_and_leaves_the_teacher_trainable():
    teacher = tiny_vit(seed=1)
    with pytest.raises(ValueError, match=r"ce_path='row': choose one of rows, sdpa, .*materialised, or None"):
        TeacherStudent(teacher, tiny_vit(seed=2), ce_path="row")
    assert all(p.requires_grad for p in teacher.parameters())  # refused before the teacher was frozen


def test_copy_from_a_wider_teacher_equals_explicit_teacher_maps():
    """Teacher head dim 32, student 16: the student's blocks apply the teacher's explicit maps to their own v."""
    from attnxfer.models import attention_maps

    teacher = peaked_teacher(depth=2, embed_dim=96)
    student = tiny_vit(depth=2, seed=7).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = attention_maps(teacher, x)
    pair = TeacherStudent(teacher, student, mode="copy").eval()
    h = _tokens(student, x)
    for i, blk in enumerate(student.blocks):
        v = blk.attn.project(blk.norm1(h), "v")["v"]
        a = (maps[i] @ v).transpose(1, 2).reshape(2, 17, 48)
        h = h + blk.attn.proj(a)
        h = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(pair(x).logits, student.forward_head(student.norm(h)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["copy", "distill"])
def test_teacher_stops_at_the_projection_of_its_last_transferred_layer(mode, monkeypatch):
    """The plan's last teacher layer only hands over q/k: its attention core, projection and MLP are not
    run, and logits, loss and gradients are exactly those of running the whole block. Logit distillation
    needs the teacher's head, so there the whole teacher runs."""
    import attnxfer.transfer.teacher_pass as teacher_pass_module

    teacher, x = peaked_teacher(depth=3), torch.randn(2, 3, 32, 32)
    results, mlp_calls = {}, []
    for block in teacher.blocks:
        block.mlp.register_forward_hook(lambda *a: mlp_calls.append(1))
    for stops in (True, False):
        if not stops:
            monkeypatch.setattr(teacher_pass_module, "AttentionIO", _NeverStops)
        mlp_calls.clear()
        student = tiny_vit(seed=2, depth=3)
        pair = TeacherStudent(teacher, student, build_plan(teacher, student, mode, end_layer=-1)).train()
        out = pair(x)
        loss = out.logits.square().mean() + (out.loss if out.loss is not None else 0)
        grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
        results[stops] = (out.logits.detach(), loss.detach(), grads, len(mlp_calls))
    # layers 0-1 transferred: block 1's MLP and block 2 skipped (without the stop the whole teacher runs)
    assert results[True][3] == 1 and results[False][3] == 3
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    mlp_calls.clear()
    monkeypatch.undo()
    student = tiny_vit(seed=2, depth=3)
    TeacherStudent(
        teacher, student, build_plan(teacher, student, mode, end_layer=-1, logit_weight=1.0)
    ).train()(x)
    assert len(mlp_calls) == 3


def test_the_earlier_name_dual_vit_still_imports_as_the_same_class_with_a_deprecation_warning():
    import attnxfer.transfer

    with pytest.warns(DeprecationWarning, match=r"transfer\.DualViT is deprecated.*transfer\.TeacherStudent"):
        from attnxfer.transfer import DualViT
    assert DualViT is TeacherStudent and "DualViT" not in attnxfer.transfer.__all__


def test_a_student_that_gives_no_gradient_is_said_why_not_blamed_on_the_loss():
    """A copy of an eval teacher is in eval mode, where a hashing layer's codes are hard signs: the built-in map
    loss then carries no gradient, and the message told its author to stop detaching tensors."""
    teacher, x = peaked_teacher(depth=2).eval(), torch.randn(2, 3, 32, 32)
    student = efficient_student_from_teacher(teacher, "hashing")
    pair = TeacherStudent(teacher, student)  # which puts the student in the pair's (training) mode
    assert pair(x).loss.requires_grad
    student.eval()  # and put back in eval after it
    with pytest.raises(
        ValueError, match=r"no gradient to the student: the pair is in training mode but its st"
    ):
        pair(x)
    assert pair.train()(x).loss.requires_grad
    student.requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"none of the student's parameters requires grad .*student\.requires_grad_\(True\)"
    ):
        pair(x)


def test_copy_from_layers_of_other_tokens_is_one_line_not_a_reshape_error():
    """A CaiT teacher's blocks leave out the class token a plain ViT's keep: its keys in the student's layer
    failed mid-forward as `shape '[8, 17, -1]' is invalid`; distillation said so in one line already."""
    from attnxfer import create_vit
    from attnxfer.errors import InputError

    teacher = timm.create_model(
        "cait_xxs24_224", img_size=32, patch_size=8, depth=2, depth_token_only=1, embed_dim=48, num_heads=3
    )
    student = create_vit(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3
    )
    pair = TeacherStudent(teacher, student, build_plan(teacher, student, "copy"))
    with pytest.raises(
        InputError, match=r"token counts differ .*the student's v 17, the teacher's k 16 tokens"
    ):
        pair.train()(torch.randn(2, 3, 32, 32))


def test_an_optimizer_built_before_a_copy_pair_is_refused_at_its_first_step_not_left_training_nothing():
    # the pair replaces the fused qkv of the 4 blocks by new parameters (q/k frozen rows, v trainable)
    teacher, student = tiny_vit(seed=1), tiny_vit(seed=2)
    early = torch.optim.AdamW(student.parameters(), lr=1e-2)
    pair = TeacherStudent(teacher, student, mode="copy")
    pair(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    with pytest.raises(ValueError, match=r"AdamW holds 8 parameter\(s\) that attnxfer replaced.*after the"):
        early.step()
    v = student.blocks[0].attn.qkv.v_weight
    before = v.detach().clone()
    torch.optim.AdamW(student_param_groups(pair, weight_decay=0.0), lr=1e-2).step()  # built after: trains v
    assert not torch.equal(v, before)


def test_a_pair_takes_models_tensors_and_its_own_mode_and_says_what_to_pass_otherwise(capsys):
    import numpy as np

    teacher = tiny_vit(seed=1)
    student = copy.deepcopy(teacher).requires_grad_(True).eval()  # a deep copy of a loaded teacher: eval
    pair = TeacherStudent(teacher, student)
    assert pair.training and student.training and not teacher.training  # the student in the pair's mode
    for batch in (np.zeros((2, 3, 32, 32), dtype="float32"), [torch.zeros(3, 32, 32)]):
        for p in (pair, pair.eval()):
            with pytest.raises(
                TypeError, match=r"^images must be a torch.Tensor \(B, C, H, W\), got (numpy|bui)"
            ):
                p(batch)
    for args in ((pair, tiny_vit(seed=2)), (teacher, pair)):
        with pytest.raises(
            TypeError, match=r"the (teacher|student) is a TeacherStudent: pass its model, pair\."
        ):
            TeacherStudent(*args)
    # one teacher shared with a bf16 pair is cast in place: a float32 pair after it is told of the rounding
    TeacherStudent(teacher, tiny_vit(seed=3), teacher_dtype=torch.bfloat16).teacher_pass(
        torch.zeros(1, 3, 32, 32)
    )
    capsys.readouterr()
    TeacherStudent(teacher, tiny_vit(seed=4)).teacher_pass(torch.zeros(1, 3, 32, 32))
    assert "the teacher's weights are torch.bfloat16" in capsys.readouterr().err
