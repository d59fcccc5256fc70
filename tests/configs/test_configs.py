"""Every algorithm config loads, validates, sweeps; validation names keys and choices."""

import importlib
import pathlib

import pytest

from configs import common
from mipo_jax.losses import loss_config, validate

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))


def load(name):
    return importlib.import_module(f"configs.{name}")


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_and_validates(name):
    module = load(name)
    config = module.get_config()
    assert config.algorithm == name or name == "default"
    validate(config.loss)
    assert module.__doc__ and "python -m mipo_jax.main" in module.__doc__
    variants = []
    module.sweep(lambda **kv: variants.append(kv))
    assert variants, f"{name}.sweep adds nothing"
    for kv in variants:
        config = module.get_config()
        config.update_from_flattened_dict(kv)
        validate(config.loss)


def test_hdpo_alpha_tracks_temperature():
    config = load("hdpo").get_config("a=0.8")
    assert config.loss.alpha == pytest.approx(0.8 * 0.1)
    config.loss.prior.temperature = 0.5
    assert config.loss.alpha == pytest.approx(0.5 * 0.1)


def test_simpo_margin_is_beta_times_ratio():
    config = load("simpo").get_config()
    assert config.loss.margin == pytest.approx(2.0 * 0.25)
    config.loss.alpha = 2.5
    assert config.loss.margin == pytest.approx(2.5 * 0.25)
    config = load("simpo").get_config("mapping=ii")
    assert config.loss.prior.gamma == pytest.approx(0.5)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("prior.name", "refrence", "choose one of: "),
        ("normalize", "median", "choose one of: sum, mean"),
        ("links", ("sigmoid", "hinj"), "choose one of: "),
        ("alpha", 0.0, "must be > 0"),
        ("label_smoothing", 0.5, "in [0, 0.5)"),
        ("f_divergence", "kl", "choose one of: "),
        ("weighting", "ipw", "choose one of: none, wpo"),
        ("link_weights", (1.0, 2.0), "one weight per link"),
    ],
)
def test_validation_rejects_with_choices(key, value, message):
    cfg = loss_config()
    cfg.unlock()
    if key == "prior.name":
        cfg.prior.name = value
    else:
        cfg[key] = value
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert message in str(err.value) and f"loss.{key}" in str(err.value)


def test_validation_lists_every_prior():
    cfg = loss_config()
    cfg.prior.name = "nope"
    with pytest.raises(ValueError, match="dpop.*reference.*token_weighted"):
        validate(cfg)


def test_prior_params_checked():
    with pytest.raises(ValueError, match="takes"):
        loss_config("reference", temperature=0.5)
    cfg = loss_config("tempered_reference", temperature=-1.0)
    with pytest.raises(ValueError, match="loss.prior.temperature"):
        validate(cfg)
    cfg = loss_config("reference")
    cfg.prior.unlock()
    cfg.prior.temperature = 0.9
    with pytest.raises(ValueError, match="does not take"):
        validate(cfg)


def test_parse_arg():
    arg = common.parse_arg("tiny,variant=tdpo1,a=0.5", tiny=False, variant="tdpo2", a=1.0)
    assert arg.tiny is True and arg.variant == "tdpo1" and arg.a == 0.5
    with pytest.raises(ValueError, match="unknown"):
        common.parse_arg("bogus=1", tiny=False)
    with pytest.raises(ValueError, match="variant"):
        load("tdpo").get_config("variant=tdpo3")
