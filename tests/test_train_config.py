"""Training configs: derived configs follow the recipe's schema; a bad key or value is one clear
error at start-up, before the model, the data or any XLA computation is built."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax import monitoring

from cga_jax.training import trainer
from cga_jax.training.recipe import digits, imagenet_recipe
from cga_jax.training.validate import ConfigError, check_config, schema_problems
from tests.train_helpers import ROOT, run, tiny_digits_config, train_cmd

_EVENTS: list[str] = []
monitoring.register_event_duration_secs_listener(lambda event, _s, **_: _EVENTS.append(event))
COMPILE = "/jax/core/compile/backend_compile_duration"


def _compiles() -> int:
    return _EVENTS.count(COMPILE)


def load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ---- the configs that ship ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,arg",
    [
        ("digits", ""),
        ("digits", "runlocal"),
        *[("efficientvit", f"m{i}") for i in range(6)],
        ("efficientvit", "m0,runlocal"),
        ("finetune", "m0"),
        ("finetune", "m5"),
    ],
)
def test_shipped_configs_are_valid_and_locked(name, arg):
    cfg = load_config(name, arg)
    assert schema_problems(cfg, imagenet_recipe()) == []
    check_config(cfg)
    with pytest.raises(AttributeError, match="lrr"):  # locked: a typo in a config file fails
        cfg.optim.lrr = 1.0


def test_derived_configs_change_single_fields():
    """digits / runlocal change only the fields they name; everything else is the recipe's."""
    base, demo, smoke = imagenet_recipe(), digits(), digits(runlocal=True)
    changed = {k for k, v in _flat(demo).items() if _flat(base)[k] != v}
    assert "optim.betas" not in changed and "optim.weight_decay" not in changed
    assert {"model.embed_dim", "data.name", "optim.lr", "img_size"} <= changed
    assert {k for k, v in _flat(smoke).items() if _flat(demo)[k] != v} == {
        "total_steps",
        "eval_every",
        "checkpoint_every",
    }


def _flat(cfg, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---- one error, before anything is built -------------------------------------------------------
BAD = [
    ("compute_dtype", "bf16", "compute_dtype='bf16': must be one of 'float32', 'bfloat16'"),
    ("distill.kind", "kd", "distill.kind='kd': must be one of 'none', 'soft', 'hard'"),
    ("data.randaugment", "rand-m9-x2", "data.randaugment='rand-m9-x2': bad RandAugment section"),
    ("data.randaugment", "augmix-m5", "must start with 'rand-'"),
    ("data.interpolation", "nearest", "data.interpolation='nearest': must be one of"),
    (
        "data.name",
        "imagenet",
        "data.name='imagenet': must be one of 'folder', 'tar', 'arrayrecord', 'digits'",
    ),
    ("data.aug", "flip", "data.aug='flip': must be one of 'rrc_flip', 'none'"),
    ("data.reprob", 1.5, "data.reprob=1.5: must be in [0, 1]"),
    ("model.name", "efficientvit_m9", "model: unknown model 'efficientvit_m9'"),
    ("model.num_heads", (3, 3, 3), "model: stage 0: embed_dim=16 is not divisible by num_heads=3"),
    ("optim.epochs", 0.0, "optim.epochs=0.0: must be > 0"),
    ("log_every", 0, "log_every=0: must be >= 1"),
]


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if the trainer gets past the config check: no data source, no model."""

    def refuse(*_a, **_k):
        raise AssertionError("built something before the config was checked")

    monkeypatch.setattr(trainer.data_lib, "make_source", refuse)
    monkeypatch.setattr(trainer, "build_model", refuse)
    monkeypatch.setattr(trainer, "build_teacher", refuse)
    before = _compiles()
    yield
    assert _compiles() == before, "an XLA computation was compiled before the config check"


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_invalid_value_is_one_error_before_anything_is_built(
    tmp_path, nothing_built, key, value, message
):
    cfg = tiny_digits_config(**{key: value})
    with pytest.raises(ConfigError) as err:
        trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid training config:" and len(lines) == 2, str(err.value)
    assert message in lines[1]
    assert not (tmp_path / "run").exists()


def test_unknown_and_missing_keys_are_named(tmp_path, nothing_built):
    d = tiny_digits_config().to_dict()  # a config built by hand, not from the recipe
    d["optim"]["lrr"] = 1.0
    del d["data"]["reprob"]
    d["distill"]["teacher"] = "efficientvit_m0"  # the old form: a name instead of a model spec
    cfg = ml_collections.ConfigDict(d)
    with pytest.raises(ConfigError) as err:
        trainer.train_and_evaluate(cfg, str(tmp_path))
    problems = str(err.value).splitlines()[1:]
    assert [p.strip() for p in problems] == [
        "missing key data.reprob",
        "distill.teacher='efficientvit_m0': expected a group of keys (depth, distillation, "
        "down_ops, drop_path_rate, drop_rate, embed_dim, impl, in_chans, kernels, key_dim, name, "
        "num_classes, num_heads, patch_size, pretrained, window_size)",
        "unknown key optim.lrr (did you mean optim.lr?)",
    ]


def test_every_problem_is_listed_once(tmp_path, nothing_built):
    cfg = tiny_digits_config(**{"compute_dtype": "bf16", "distill.kind": "soft"})
    with pytest.raises(ConfigError) as err:
        trainer.train_and_evaluate(cfg, str(tmp_path))
    assert str(err.value).splitlines()[1:] == [
        "  compute_dtype='bf16': must be one of 'float32', 'bfloat16'",
        "  distill.teacher.name='': distill.kind='soft' needs a teacher model",
    ]


def test_the_compile_counter_counts():
    """The guard of the tests above: a fresh jit does register a compilation."""
    before = _compiles()
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7))
    assert _compiles() > before


# ---- train.py: the same errors from the command line, one line, no traceback --------------------
def test_train_py_unknown_override_key(tmp_path):
    r = run(train_cmd(tmp_path / "run", "--config.optim.lrr=1"), timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [
        "FATAL Flags parsing error: --config.optim.lrr: the config has no key 'lrr'. "
        'Did you mean "lr" instead of "lrr"?'
    ]
    assert not (tmp_path / "run").exists()


def test_train_py_invalid_values(tmp_path):
    r = run(
        train_cmd(
            tmp_path / "run", "--config.compute_dtype=bf16", "--config.data.randaugment=rand-m9-q1"
        ),
        timeout=300,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[:3] == [
        "ERROR: invalid training config:",
        "  compute_dtype='bf16': must be one of 'float32', 'bfloat16'",
        "  data.randaugment='rand-m9-q1': bad RandAugment section 'q1' in 'rand-m9-q1': expected "
        "m<int>, n<int>, mstd<float>, mmax<int>, inc<0|1> or p<float> (e.g. 'rand-m9-mstd0.5-inc1')",
    ]
    assert not (tmp_path / "run").exists()
