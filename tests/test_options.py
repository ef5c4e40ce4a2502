"""Training options: one dataclass, one place for the defaults, one validation layer whose
errors name the flag, the bad value and what would be valid; resume merging."""

import argparse
import dataclasses
import math
from pathlib import Path

import pytest

from minimoe import backend
from minimoe.errors import OptionError, UserError
from minimoe.options import (
    DEFAULTS,
    FIELDS,
    LOCKED_ON_RESUME,
    MODEL_FLAGS,
    TrainOptions,
    _name_flags,
    check_options,
    given_options,
    model_config,
    resolve_options,
)
from minimoe.presets import toy_presets


def options(**given) -> TrainOptions:
    return resolve_options(given)


def test_every_field_starts_not_given_and_defaults_live_in_one_place():
    assert all(v is None for v in dataclasses.asdict(TrainOptions()).values())
    unset = {k for k, v in dataclasses.asdict(DEFAULTS).items() if v is None}
    assert unset == set(MODEL_FLAGS) | {"min_lr", "init_from"}  # "the preset's", "lr / 10", "no base model"
    assert options() == DEFAULTS
    check_options(DEFAULTS)  # the defaults are valid


BAD = [
    (dict(preset="gpt9"), f"--preset = 'gpt9' is invalid: valid presets are {', '.join(toy_presets())}"),
    (dict(preset="gpt3-175b"), "kept for counting only; train one of dense"),
    (dict(tokenizer="words"), "--tokenizer = 'words' is invalid: use one of char, bpe"),
    (dict(device="tpu"), "--device = 'tpu' is invalid: use one of cpu, gpu"),
    (dict(dtype="float16"), f"--dtype = 'float16' is invalid: use one of {', '.join(backend.DTYPES)}"),
    (dict(vocab_size=100), "--vocab-size = 100 is invalid: it must be an integer >= 256"),
    (dict(max_iters=0), "--max-iters = 0 is invalid: it must be an integer >= 1"),
    (dict(batch_size=2.5), "--batch-size = 2.5 is invalid: it must be an integer >= 1"),
    (dict(log_interval=True), "--log-interval = True is invalid"),
    (dict(seed=-1), "--seed = -1 is invalid: it must be an integer >= 0"),
    (dict(warmup_iters=-5), "--warmup-iters = -5 is invalid"),
    (dict(lr=0.0), "--lr = 0.0 is invalid: it must be a finite number > 0"),
    (dict(lr=math.nan), "--lr = nan is invalid"),
    (
        dict(lr=1e-3, min_lr=2e-3),
        "--min-lr = 0.002 is invalid: it must be a finite number >= 0.0 and <= 0.001",
    ),
    (dict(weight_decay=-0.1), "--weight-decay = -0.1 is invalid"),
    (dict(grad_clip=math.inf), "--grad-clip = inf is invalid"),
]


@pytest.mark.parametrize("given,message", BAD, ids=[next(iter(g)) + f"-{i}" for i, (g, _) in enumerate(BAD)])
def test_check_options_names_the_flag_and_what_is_valid(given, message):
    with pytest.raises(OptionError) as e:
        check_options(options(**given))
    assert message in str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "given,message",
    [
        (dict(n_layer=-1), "--n-layer = -1 is invalid: it must be an integer >= 1"),
        (dict(n_embd=100, n_head=3), "--n-embd = 100 is invalid: it must be divisible by n_head = 3"),
        (dict(n_experts=4, top_k=5), "--top-k = 5 is invalid: it must be between 1 and n_experts = 4"),
        (dict(dropout=1.0), "--dropout = 1.0 is invalid: it must be in [0, 1)"),
        (dict(n_experts=-2), "--n-experts = -2 is invalid"),
        (dict(block_size=0), "--block-size = 0 is invalid"),
    ],
)
def test_model_flags_are_judged_by_config_and_named_as_flags(given, message):
    o = options(**given)
    check_options(o)  # not judged twice: Config.validate is the one judge of the model's shape
    with pytest.raises(OptionError) as e:
        model_config(o, vocab_size=256)
    assert str(e.value).startswith(message)
    assert "Config." not in str(e.value)


def test_a_config_field_that_is_no_flag_keeps_its_name_and_says_which_preset():
    msg = _name_flags("Config.n_kv_head = 3 is invalid: it must divide n_head = 4", "mixtral")
    assert msg == "the preset 'mixtral' with the flags given is not a valid model: Config.n_kv_head = 3 is invalid: it must divide n_head = 4"  # fmt: skip


def test_model_config_applies_the_flags_to_the_preset():
    c = model_config(options(preset="switch", n_layer=2, dropout=0.1), vocab_size=300)
    assert (c.name, c.n_layer, c.dropout, c.vocab_size, c.top_k, c.n_embd) == ("switch", 2, 0.1, 300, 1, 128)


def test_given_options_from_each_kind_of_caller():
    assert given_options(None) == {}
    assert given_options(TrainOptions(lr=1e-3, resume=False)) == {"lr": 1e-3, "resume": False}
    assert given_options({"lr": 1e-3, "seed": None}) == {"lr": 1e-3}
    ns = argparse.Namespace(command="train", func=print, max_iters=5, out=None)
    assert given_options(ns) == {"max_iters": 5}
    assert given_options({"out": Path("runs") / "a"}) == {"out": str(Path("runs") / "a")}  # JSON-able
    with pytest.raises(OptionError, match=r"unknown training option\(s\) \['max_itres'\]"):
        given_options({"max_itres": 3})


def test_resolve_prefers_given_then_saved_then_defaults():
    saved = dict(dataclasses.asdict(DEFAULTS), lr=1e-2, max_iters=100, seed=7, resume=False, obsolete=1)
    o = resolve_options({"lr": 1e-3, "max_iters": 200, "resume": True}, saved=saved)
    assert o.lr == 1e-3  # given, although equal to the default: it must win over the checkpoint's 1e-2
    assert o.max_iters == 200 and o.resume is True
    assert o.seed == 7  # not given: the checkpoint's
    assert o.batch_size == DEFAULTS.batch_size  # neither: the default
    old = {k: v for k, v in saved.items() if k not in ("warmup_iters", "obsolete")}  # an older checkpoint
    assert resolve_options({}, saved=old).warmup_iters == DEFAULTS.warmup_iters


@pytest.mark.parametrize("name", LOCKED_ON_RESUME)
def test_resume_keeps_the_checkpoints_model(name):
    saved = dict(dataclasses.asdict(DEFAULTS), n_layer=2, block_size=32, n_head=2)
    if name in ("vocab_size", *MODEL_FLAGS):
        given_value = (saved[name] or 1) * 2
    else:
        given_value = {"preset": "dense", "tokenizer": "bpe", "dtype": "float64"}[name]
    with pytest.raises(OptionError, match=f"--{name.replace('_', '-')} .* differs from the checkpoint's"):
        resolve_options({name: given_value}, saved=saved)
    same = resolve_options({name: saved[name]}, saved=saved) if saved[name] is not None else None
    assert same is None or getattr(same, name) == saved[name]


def test_fields_are_the_train_flags():
    assert FIELDS == tuple(f.name for f in dataclasses.fields(TrainOptions))
    assert set(LOCKED_ON_RESUME) <= set(FIELDS) and set(MODEL_FLAGS) <= set(FIELDS)
