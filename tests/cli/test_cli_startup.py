"""An instant CLI: `--help`, every subcommand's `--help` and every argument or config error answer without
importing torch or timm (which take seconds and a gigabyte); the library's public names still import."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import attnxfer

ROOT = Path(__file__).resolve().parents[2]

#: (argv, exit code, a piece of what the user reads)
CASES = [
    (["--help"], 0, "usage: attnxfer"),
    (["--version"], 0, "attnxfer 0."),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
    # a near miss of the command's own flag is answered with it (argparse names none)
    (["train", "--print_config"], 2, "unrecognized arguments: --print_config; did you mean --print-config?"),
    (["inspect", "t", "s", "--num_images", "3"], 2, "--num_images 3; did you mean --num-images?"),
    # Hugging Face's name for the format that transformers loads: the timm one, not argparse's bare choices
    (
        ["export", "runs/r", "out", "--format", "transformers"],
        2,
        "argument --format: 'transformers' is the timm format (the default: config.json + model.safetensors), "
        "which transformers loads too: AutoModelForImageClassification.from_pretrained(OUT_DIR)",
    ),
    # the command's own usage above the error, not attnxfer's
    (["export", "runs/r", "--out", "x"], 2, "usage: attnxfer export"),
    # an argument written as a flag, as timm's, MAE's and Hugging Face's scripts take it: the command as it is
    # taken, the user's values in their places and the command's own flags kept
    (
        ["export", "--output_dir", "out dir", "--run-dir=runs/r", "--weights", "raw"],
        2,
        "--output_dir, --run-dir: export takes them as arguments, written without a flag: "
        "attnxfer export runs/r 'out dir' --weights raw",
    ),
    (["export", "runs/r", "-o", "x"], 2, "-o: export takes it as an argument, written without a flag: "),
    (["export", "runs/r", "--out"], 2, "written without a flag: attnxfer export runs/r OUT_DIR"),
    # argparse asked first would say STUDENT is missing (it reads --teacher as --teacher-arch)
    (
        ["inspect", "--teacher", "t", "--num", "3", "--students", "s1", "s2"],
        2,
        "--teacher, --students: inspect takes them as arguments, written without a flag: "
        "attnxfer inspect t s1 s2 --num-images 3",
    ),
    (["inspect", "t", "--student", "s"], 2, "written without a flag: attnxfer inspect t s\n"),
    (["fetch", "--spec", "vit_tiny"], 2, "--spec: fetch takes it as an argument, written without a flag"),
    # timm's and MAE's flags answered with the override that means them
    (
        ["train", "--epochs", "3", "--lr=1e-3", "--output_dir", "runs/x"],
        2,
        "attnxfer takes config values as key=value: schedule.epochs=3 optim.lr=1e-3 run_dir=runs/x",
    ),
    # each flag listed with its value as written (argparse takes the first lone value as an override)
    (
        ["train", "--epochs", "3", "--lr", "1e-3", "--lr", "2e-3"],
        2,
        "unrecognized arguments: --epochs 3 --lr 1e-3 --lr 2e-3; attnxfer takes config values as key=value: "
        "schedule.epochs=3 optim.lr=1e-3 optim.lr=2e-3",
    ),
    # Hydra's multirun spelling, key=V1,V2, or a second key after --vary (which takes one): the flag that
    # gives one value to each student, job or run, not the key's type
    (
        ["study", "-c", "demo/distill", "--vary", "transfer.atd_weight=1,3", "transfer.mode=copy,distill"],
        2,
        "transfer.mode=copy,distill gives every student one value, which transfer.mode cannot take: to give each "
        "student one of them, write --vary transfer.mode=copy,distill (one --vary for each key)",
    ),
    (  # a key every student shares: a study for each value
        ["study", "-c", "demo/distill", "--vary", "transfer.atd_weight=1,3", "data.batch_size=8,16"],
        2,
        "every student of a study shares data.batch_size: a study for each is `attnxfer submit --command study "
        "--sweep data.batch_size=8,16`",
    ),
    (
        ["submit", "-c", "demo/distill", "--sweep", "transfer.atd_weight=1,3", "transfer.mode=copy,distill"],
        2,
        "gives every job one value, which transfer.mode cannot take: to submit one job for each, write --sweep "
        "transfer.mode=copy,distill (one --sweep for each key)",
    ),
    (
        ["train", "-c", "demo/distill", "transfer.atd_weight=1,3"],
        2,
        "transfer.atd_weight=1,3 is one value, which transfer.atd_weight cannot take: a run for each is `attnxfer "
        "submit --sweep transfer.atd_weight=1,3` (a job for each) or `attnxfer study --vary transfer.atd_weight=1,3`",
    ),
    (  # no study of MAE pre-training
        ["pretrain", "-c", "demo/mae_pretrain", "mae.mask_ratio=0.5,0.75"],
        2,
        "a run for each is `attnxfer submit --command pretrain --sweep mae.mask_ratio=0.5,0.75` (a job for each)\n",
    ),
    # a value with a comma that the key takes is taken; one whose parts it refuses keeps the key's own answer
    (["train", "-c", "demo/distill", "run_dir=runs/a,b", "--print-config"], 0, "run_dir: runs/a,b\n"),
    (["train", "transfer.mode=copy,distil"], 2, "transfer.mode: 'copy,distil' is not one of none, copy,"),
    (["train", "epochs=3"], 2, "unknown config key 'epochs'; did you mean 'schedule.epochs'?"),
    (["train", "epoch=3"], 2, "unknown config key 'epoch'; did you mean 'schedule.epochs'?"),
    (["train", "warmup=1"], 2, "unknown config key 'warmup'; did you mean 'schedule.warmup_epochs'?"),
    (["train", "badkey=1"], 2, "unknown config key 'badkey' (valid under the top level:"),  # no far guess
    (
        ["train", "transfer.atd=1"],
        2,
        "unknown config key 'transfer.atd'; did you mean 'transfer.atd_weight'?",
    ),
    (["train", "data.data_path=/x"], 2, "unknown config key 'data.data_path'; did you mean 'data.root'?"),
    # a near spelling that means something else is no answer: steps is not optim.eps, out not convert.output_mse
    (["train", "steps=10"], 2, "unknown config key 'steps'; did you mean 'schedule.max_steps'?"),
    (["train", "--out", "runs/x"], 2, "attnxfer takes config values as key=value: run_dir=runs/x"),
    # the weights to start from, not the checkpoint section (saves and resume)
    (
        ["train", "initial_checkpoint=w.pth"],
        2,
        "unknown config key 'initial_checkpoint'; did you mean 'model.init'?",
    ),
    (["train", "--finetune", "mae.pth"], 2, "attnxfer takes config values as key=value: model.init=mae.pth"),
    # timm's, MAE's and Hugging Face's spellings: attnxfer's key, never a section or a far guess (lr_base was
    # answered 'transfer', log_interval 'eval', save_steps 'convert.stage1_steps', warmup_lr 'run_dir')
    (["train", "lr_base=5e-4"], 2, "unknown config key 'lr_base'; did you mean 'optim.blr'?"),
    # MAE's --eval (score instead of train) is another command here, not the eval section's value
    (["train", "eval=true"], 2, "not MAE's --eval switch: to score a trained run, run attnxfer eval -c"),
    (["train", "log_interval=50"], 2, "unknown config key 'log_interval'; did you mean 'log.every_steps'?"),
    (
        ["train", "save_steps=500"],
        2,
        "unknown config key 'save_steps'; did you mean 'checkpoint.every_steps'?",
    ),
    (["train", "optim.learning_rate=1e-3"], 2, "'optim.learning_rate'; did you mean 'optim.lr'?"),
    (
        ["train", "warmup_lr=1e-6"],
        2,
        "'warmup_lr': the learning rate warms up linearly over schedule.warmup_",
    ),
    (["train", "optimizer.lr=1e-3"], 2, "unknown config key 'optimizer'; did you mean 'optim'?"),
    (
        [
            "train",
            "--lr-base",
            "5e-4",
            "--aa",
            "rand-m9-mstd0.5",
            "--drop",
            "0.1",
            "--model-ema-decay",
            "0.9998",
        ],
        2,
        "key=value: optim.blr=5e-4 aug.auto_augment=rand-m9-mstd0.5 model.kwargs.drop_rate=0.1 ema.decay=0.9998",
    ),
    (["train", "teacher.name=x"], 2, "unknown config key 'teacher.name'; did you mean 'teacher.spec'?"),
    # a choice attnxfer does not offer (one optimiser, one schedule) is answered with what it does, not with a
    # near spelling (optim.opt was answered 'optim.eps', optim.momentum 'optim.beta2', schedule.name 'model.name')
    (
        ["train", "optim.opt=lamb"],
        2,
        "unknown config key 'optim.opt': attnxfer trains with AdamW (the paper's",
    ),
    (["train", "optim=adamw_torch"], 2, "optim=adamw_torch: attnxfer trains with AdamW"),
    (
        ["train", "optim.momentum=0.9"],
        2,
        "offers no other; its keys are optim.lr (or optim.blr), optim.weight_",
    ),
    (["train", "optim.betas=[0.9,0.95]"], 2, "'optim.betas': attnxfer trains with AdamW"),  # beta1 and beta2
    (  # DINO's decay schedule: not the constant weight decay of a near spelling
        ["train", "--weight_decay_end", "0.1"],
        2,
        "optim.weight_decay stays one value for the whole run, as timm and MAE keep it",
    ),
    (
        ["train", "optim.layer_decay_rate=0.75"],
        2,
        "did you mean 'optim.layer_decay'?",
    ),  # the rate, not the rule
    (  # no key sets how often a run evaluates: when it does is said, not a log or checkpoint key
        ["train", "eval.every=1"],
        2,
        "unknown config key 'eval.every': a run evaluates at the end of every epoch and of the run",
    ),
    (
        ["train", "schedule.name=step"],
        2,
        "'schedule.name': the learning rate warms up linearly over schedule.",
    ),
    (
        ["train", "--sched", "step", "--opt", "sgd", "--epochs", "3"],
        2,
        "--epochs 3; attnxfer takes config values as key=value: schedule.epochs=3; the learning rate warms up "
        "linearly over schedule.warmup_epochs (step k of W at lr·(k+1)/W), then falls on a half-cosine to "
        "optim.min_lr (timm's and MAE's "
        "cosine), the one schedule attnxfer has; schedule.epochs or schedule.max_steps sets its length; attnxfer "
        "trains with AdamW",
    ),
    (["train", "ema.momentum=0.99"], 2, "unknown config key 'ema.momentum'; did you mean 'ema.decay'?"),
    # timm's one-letter flags, its C H W input size, several numbers and switches: the override each means (the
    # input size was answered data.img_size=3, a switch key=VALUE, -b and -j not at all)
    (
        ["train", "-b", "64", "-j", "8", "--input-size", "3", "224", "224", "--mean", "0.5", "0.5", "0.5"],
        2,
        "key=value: data.batch_size=64 data.num_workers=8 data.img_size=224 data.mean=[0.5,0.5,0.5]",
    ),
    # Hugging Face's flags; its warmup in steps was answered schedule.warmup_epochs=100 (epochs, not steps)
    (
        ["train", "--warmup_steps", "100", "--report_to", "wandb", "--bf16", "--std", "0.5"],
        2,
        "key=value: log.trackers=[wandb] precision=bf16 data.std=[0.5]; schedule.warmup_epochs sets the warmup in "
        "epochs, "
        "fractions allowed (S steps: S over the steps an epoch takes",
    ),
    (
        ["train", "--adam_beta2", "0.95", "--eval_strategy", "steps", "--push_to_hub"],
        2,
        "key=value: optim.beta2=0.95; a run evaluates at the end of every epoch and of the run, and saves there "
        "too (checkpoint.every_epoch), every checkpoint.every_steps steps and every checkpoint.every_minutes "
        "minutes; a run's student reaches the Hub through its export: attnxfer export RUN_DIR OUT_DIR --push-to-hub",
    ),
    (["train", "--dataset-download"], 2, "--dataset-download; there is no download switch: torch/NAME reads"),
    # timm's --grad-checkpointing and Hugging Face's gradient_checkpointing: the key that switches it on
    (
        ["train", "--grad-checkpointing"],
        2,
        "attnxfer takes config values as key=value: model.grad_checkpointing=true",
    ),
    (["train", "gradient_checkpointing=true"], 2, "did you mean 'model.grad_checkpointing'?"),
    # MAE's model names (its repository's, without timm's resolution) were answered 'samvit_large_patch16'
    (
        ["pretrain", "model.name=mae_vit_large_patch16"],
        2,
        "MAE's mae_vit_large_patch16 is timm's 'vit_large_patch16_224' (with a decoder the mae section shapes)",
    ),
    (
        ["train", "--model-kwargs", "depth=4", "drop_rate=0.1", "--epochs", "2"],
        2,
        "key=value: model.kwargs.depth=4 model.kwargs.drop_rate=0.1 schedule.epochs=2",
    ),
    (
        ["train", "--pin-mem", "--amp", "--model-ema", "--log-wandb"],
        2,
        "key=value: data.pin_memory=true precision=bf16 ema.decay=0.9998 log.trackers=[tensorboard,wandb]",
    ),
    # the student's architecture is its timm name (model.type was answered 'teacher.dtype')
    (["train", "model.type=vit"], 2, "unknown config key 'model.type'; did you mean 'model.name'?"),
    # the blocks a conversion converts are chosen by convert.attention, not by a layer list elsewhere
    (
        ["convert", "convert.layers=[0]"],
        2,
        "'convert.layers': convert.attention chooses the blocks a conversion converts: one name per block "
        "(softmax where a block keeps the teacher's attention",
    ),
    # a transfer or a conversion without a teacher is a config error, said before torch loads (it took 11 s)
    (["train"], 2, "transfer.mode=distill needs a teacher: set teacher.spec"),
    (["convert"], 2, "attnxfer convert needs a teacher: set teacher.spec"),
    # stage 2's length is the run's schedule: convert.stage1_steps, its nearest spelling, is stage 1's
    (
        ["convert", "convert.stage2_steps=5"],
        2,
        "'convert.stage2_steps': a conversion's stage 2 is a training run of the config's own keys: its length "
        "is schedule.max_steps or schedule.epochs",
    ),
    # sbatch's own spellings given to submit: its flag for each (argparse named none), --slurm for the rest
    (
        ["submit", "--dry-run", "-p", "gpu", "--gres", "gpu:4", "--mem-per-cpu", "4G", "--job-name", "x"],
        2,
        "-p is sbatch's: submit takes --partition gpu; --gres is sbatch's: submit takes --gpus-per-node 4; "
        "--mem-per-cpu is sbatch's: submit takes --slurm mem-per-cpu=4G; --job-name is sbatch's: submit takes "
        "--name x",
    ),
    (
        ["submit", "--dry-run", "--output", "x.log"],
        2,
        "--output is sbatch's: submitit sets it, writing the job",
    ),
    # no abbreviations: sbatch's --gpus 4 (the job's GPUs) was taken as --gpus-per-node 4, 8 GPUs on 2 nodes
    (
        ["submit", "--dry-run", "--gpus", "4", "--nodes", "2"],
        2,
        "--gpus is sbatch's: submit takes --gpus-per-node, each node's GPUs (sbatch's --gpus 4 counts the job's: "
        "divide by --nodes)",
    ),
    # convert's --skip-stage1 given to submit: the key it spells (argparse said only "unrecognized")
    (
        ["submit", "--dry-run", "--command", "convert", "--skip-stage1"],
        2,
        "--skip-stage1 is convert's spelling of convert.stage1_steps=0: give the job that key",
    ),
    (["train", "--print"], 2, "unrecognized arguments: --print; did you mean --print-config?"),
    # sbatch's -c is CPUs per task: read as a second config, it was answered "write base: demo/copy in 8"
    (
        ["submit", "--dry-run", "-c", "demo/copy", "-c", "8"],
        2,
        "-c 8: -c is the config (a YAML file or recipe) here; sbatch's -c 8 (CPUs per task) is --cpus-per-task 8",
    ),
    (["train", "data.path=/x"], 2, "unknown config key 'data.path'; did you mean 'data.root'?"),
    (["train", "optim.wd=0.1"], 2, "unknown config key 'optim.wd'; did you mean 'optim.weight_decay'?"),
    (["train", "device=gpu"], 2, "device: 'gpu' is not one of auto, cpu, cuda; did you mean 'cuda'?"),
    (
        ["train", "device=cuda:1"],
        2,
        "did you mean 'cuda'? (GPU 1 alone: CUDA_VISIBLE_DEVICES=1 attnxfer ...)",
    ),
    # Lightning's and PyTorch's spellings of a precision (16-mixed had no answer, bfloat16 the nearest)
    (
        ["train", "precision=16-mixed"],
        2,
        "precision: '16-mixed' is not one of auto, fp32, bf16, fp16; did you mean 'fp16'?",
    ),
    (["train", "model.depth=4"], 2, "unknown config key 'model.depth'; did you mean 'model.kwargs.depth'?"),
    (
        ["train", "transfer.weight=3"],
        2,
        "unknown config key 'transfer.weight'; did you mean 'transfer.atd_weight' or 'transfer.task_weight'?",
    ),
    (["export"], 2, "the following arguments are required: run_dir, out_dir"),
    (["train", "bogus.key=1"], 2, "unknown config key 'bogus'"),
    # an unknown key is answered with the sections its command reads, not another command's alone
    (
        ["train", "foo.bar=1"],
        2,
        "valid under the top level: run_dir, seed, device, precision, deterministic, model",
    ),
    (["train", "foo.bar=1"], 2, " checkpoint, eval, dist)"),
    (["convert", "foo=1"], 2, " checkpoint, eval, convert, dist)"),
    (
        ["pretrain", "foo=1"],
        2,
        " teacher, data, aug, optim, schedule, ema, log, checkpoint, eval, mae, dist)",
    ),
    (["train", "search.populaton=3"], 2, "convert_recipe; only `attnxfer search` reads the search section)"),
    # an unquoted list the shell split where a piece starts with `-`: told to quote it, not argparse's "flag?"
    *[
        ([cmd, "transfer.layers=[0,", "-1]"], 2, "quote the whole override, 'transfer.layers=[0, -1]'")
        for cmd in ("train", "convert", "study", "pretrain", "search", "submit", "eval")
    ],
    (["train", "transfer.layers=[0,", "-1]", "--foo"], 2, "unrecognized arguments: --foo"),
    (["train", "-c", "no/such_recipe"], 2, "does not exist"),
    # a job's or a study's command written as a word, as `attnxfer COMMAND` takes it: its flag named
    (
        ["submit", "train", "-c", "demo/copy"],
        2,
        "'train' is a command, not a key=value override: name it with --command train",
    ),
    (["submit", "convert", "-c", "convert/demo_hedgehog"], 2, "override: name it with --command convert"),
    (["study", "convert", "-c", "convert/demo_study"], 2, "override: name it with --command convert"),
    (
        ["submit", "-c", "demo/copy", "eval"],
        2,
        "'eval' is a command, not a key=value override: run attnxfer eval",
    ),
    (["convert", "optim.lr=-1"], 2, "optim.lr"),
    (["submit", "--nodes", "two"], 2, "invalid int value: 'two'"),
    (["inspect", "t", "s", "--num-images", "0"], 2, "--num-images must be at least 1, got 0"),
    (["inspect", "t", "s", "--noise", "-0.1"], 2, "--noise is the floor's noise std: it must be >= 0"),
    (["demo", "--budget-steps", "0"], 2, "must be >= 1, got 0"),
    (["demo", "--seeds", "0"], 2, "argument --seeds: must be >= 1, got 0"),
    (["pretrain", "mae.decoder_dim=8", "mae.decoder_heads=3"], 2, "mae.decoder_dim=8 does not split into"),
    (["search", "search.seeds=[]"], 2, "search.seeds=[] names no formula to start from"),
    (["study", "-c", "demo/distill", "--vary", "transfer.atd_weight"], 2, "--vary expects KEY=VALUE"),
    (
        ["study", "-c", "demo/distill", "--vary", "transfer.atd_weight=1,"],
        2,
        "--vary transfer.atd_weight= needs",
    ),
    (  # a study's recipe given to a single run's command: the spelling that runs it, from submit too
        ["submit", "--command", "convert", "-c", "convert/demo_study"],
        2,
        "attnxfer study -c convert/demo_study or attnxfer submit --command study -c convert/demo_study",
    ),
    (["search", "--array-tasks", "-1"], 2, "--array-tasks must be >= 0 (0: in this process), got -1"),
    (["search", "--array-tasks", "2", "--gpus-per-node", "2"], 2, "--gpus-per-node 2: a task uses one GPU"),
    (["search", "--gpus-per-node", "1"], 2, "--gpus-per-node only apply to --array-tasks K"),
    (
        ["search", "--wait-timeout", "-5"],
        2,
        "--wait-timeout is seconds to wait for a generation: it must be > 0",
    ),
    # a value outside a registry's names, whatever else is wrong (demo/distill's teacher folder need not exist)
    (
        ["train", "-c", "demo/distill", "transfer.mode=distil"],
        2,
        "transfer.mode: 'distil' is not one of none, copy, copy_q, copy_k, copy_v, distill, distill_q, "
        "distill_k, distill_v; did you mean 'distill'?",
    ),
    (
        ["train", "-c", "demo/distill", "model.attention=[performer,perfromer]"],
        2,
        "model.attention[1]: 'perfromer' is not a registered attention; did you mean 'performer'? (one of agent,",
    ),
    (["train", "model.name=vit_mirco_patch4_28"], 2, "did you mean 'vit_micro_patch4_28'?"),
    (  # the one element of a list outside its set, named by its place
        ["train", "log.trackers=[tensorboard,tensorbaord]"],
        2,
        "log.trackers[1]: 'tensorbaord' is not one of tensorboard, wandb, mlflow; did you mean 'tensorboard'?",
    ),
    (
        ["train", "transfer.losses=[{name: logit_kdd}]"],
        2,
        "'logit_kdd' is not a comparison loss; did you mean",
    ),
    (  # a formula written without its prefix: the spelling that names it, told without importing torch
        ["convert", "convert.attention=sum(relu)"],
        2,
        "convert.attention: 'sum(relu)' is not a registered attention; a formula is named with its prefix: "
        "did you mean 'formula:sum(relu)'?",
    ),
    (
        ["convert", "convert.attention=hedgehgo"],
        2,
        "convert.attention: 'hedgehgo' is not a registered attention",
    ),
    (  # a word several names share (or a slip of it) is answered with all of them, not difflib's first
        ["convert", "convert.attention=linera"],
        2,
        "'linera' is not a registered attention; did you mean one of 'elu_linear', 'focused_linear', "
        "'relu_linear', 'window_linear'? (one of",
    ),
    (
        ["study", "-c", "demo/distill", "--vary", "model.attention=hedgehog,hedgehgo"],
        2,
        "did you mean 'hedgehog'",
    ),
]
COMMANDS = [
    "train",
    "study",
    "pretrain",
    "eval",
    "demo",
    "convert",
    "search",
    "submit",
    "export",
    "inspect",
    "fetch",
]


def test_every_command_module_is_the_command_of_its_name():
    """One file per command: ``launch/commands/<name>.py`` registers ``attnxfer <name>``, and the startup
    checks here cover every one."""
    from attnxfer.launch.commands import COMMANDS as REGISTERED

    files = {p.stem for p in (ROOT / "attnxfer" / "launch" / "commands").glob("*.py")} - {"__init__", "base"}
    registered_by = {name: command.run.__module__.rsplit(".", 1)[-1] for name, command in REGISTERED.items()}
    assert registered_by == {name: name for name in files}
    assert list(REGISTERED) == COMMANDS  # in the order `attnxfer --help` lists them


def test_every_command_says_what_it_does_in_a_line_and_in_its_own_help():
    """`attnxfer --help` gives each command a line, and `attnxfer CMD --help` a description above its
    options: a newcomer reading either learns what the command is for."""
    from attnxfer.launch.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "train" in a.choices)
    lines = {a.dest: a.help for a in sub._choices_actions}
    assert sorted(lines) == sorted(COMMANDS)
    assert all(text and len(text) <= 110 for text in lines.values()), lines
    described = {name: parser.description for name, parser in sub.choices.items()}
    assert all(text and len(text) > 20 for text in described.values()), [
        n for n, t in described.items() if not t
    ]


# One interpreter runs every case (each through `main`, as the `attnxfer` script does) and reports after
# each which of the heavy modules are loaded: the first case that imports torch is named.
_PROBE = """
import contextlib, io, json, sys
from attnxfer.launch.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    heavy = sorted(m for m in ("torch", "timm", "torchvision", "submitit") if m in sys.modules)
    out.append({"argv": argv, "code": code, "text": text.getvalue(), "heavy": heavy})
print(json.dumps(out))
"""


def _probe(argvs: list[list[str]]) -> list[dict]:
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argvs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)


def test_help_and_argument_errors_import_neither_torch_nor_timm():
    argvs = [argv for argv, _, _ in CASES] + [[cmd, "--help"] for cmd in COMMANDS]
    results = _probe(argvs)
    for (argv, code, says), r in zip(CASES, results, strict=False):
        assert r["code"] == code, (argv, r)
        assert says in r["text"], (argv, r["text"])
    for cmd, r in zip(COMMANDS, results[len(CASES) :], strict=True):
        assert r["code"] == 0 and f"usage: attnxfer {cmd}" in r["text"], r
    loaded = [(r["argv"], r["heavy"]) for r in results if r["heavy"]]
    assert not loaded, f"first case that imported a heavy module: {loaded[0]}"


@pytest.mark.slow
def test_bare_import_is_light_and_every_public_name_still_imports():
    code = (
        "import sys, attnxfer; light = 'torch' not in sys.modules and 'timm' not in sys.modules; "
        "from attnxfer import build_plan; print(light, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
    from attnxfer import checkpoints, models, sources, transfer

    homes = {"checkpoints": checkpoints, "models": models, "sources": sources, "transfer": transfer}
    for name in attnxfer.__all__:
        if name == "__version__":
            continue
        value = getattr(attnxfer, name)
        assert any(getattr(home, name, None) is value for home in homes.values()), name
    namespace: dict = {}
    exec("from attnxfer import *", namespace)
    assert set(attnxfer.__all__) <= set(namespace)
    assert set(attnxfer.__all__) <= set(dir(attnxfer)) and "models" in dir(attnxfer)
    assert not {"functools", "warnings", "Any"} & set(dir(attnxfer))  # its own imports are not its names
    code = "import attnxfer; print(attnxfer.models.create_vit is attnxfer.create_vit, attnxfer.config.TrainConfig)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("True <class 'attnxfer.config.schema.TrainConfig'>"), out.stdout + out.stderr
    try:
        attnxfer.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def test_names_of_earlier_releases_still_resolve_with_one_warning_naming_the_new_spelling():
    """Code written against an earlier release keeps working for one more: each dropped top-level name is the
    same object as its new home, read with a DeprecationWarning (attributed to the reader's line) that says
    what to write instead; `dir` and `__all__` do not offer the old names, and unknown names still fail."""
    from attnxfer.transfer import TeacherStudent

    assert attnxfer._RENAMED.get("DualViT") == "TeacherStudent"  # renamed when it ran every family
    for old, new in attnxfer._RENAMED.items():
        home = attnxfer
        for part in new.split("."):
            home = getattr(home, part)
        with pytest.warns(DeprecationWarning) as caught:
            value = getattr(attnxfer, old)
        assert value is home, old
        assert len(caught) == 1 and caught[0].filename == __file__, [str(w.message) for w in caught]
        assert f"attnxfer.{old} is deprecated" in str(caught[0].message)
        assert f"use attnxfer.{new} " in str(caught[0].message)
        assert old not in dir(attnxfer) and old not in attnxfer.__all__
    with pytest.warns(DeprecationWarning, match="use attnxfer.TeacherStudent "):
        from attnxfer import DualViT
    assert DualViT is TeacherStudent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown name warns nothing: it fails as any module's would
        with pytest.raises(AttributeError, match=r"^module 'attnxfer' has no attribute 'DualVit'$"):
            attnxfer.DualVit  # noqa: B018
