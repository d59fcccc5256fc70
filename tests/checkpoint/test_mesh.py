"""A checkpoint saved on 8 devices, mesh (data=2, fsdp=2, tensor=2), restored in subprocesses
with 4 devices (mesh 1x4x1) and 1 device (1x1x1): identical values, the new mesh's shardings,
and the next train step agrees with the 8-device one."""

import json

import numpy as np
import pytest

from tests import multiprocess_worker as w

TARGETS = {"4dev": (4, (1, 4, 1)), "1dev": (1, (1, 1, 1))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Train 2 steps on the 8-device mesh, save, then take one more step for reference."""
    workdir = tmp_path_factory.mktemp("mesh8")
    mesh = w.make_mesh((2, 2, 2))
    ckpt = w.make_checkpointer(workdir, save_every=2)
    result = w.run_training(ckpt, mesh, total_steps=2)
    ckpt.close()
    state = result["state"]
    saved_values = w.flatten(state)
    next_state, loss = w.jit_step(mesh)(state, w.Data(2).next_global(mesh))
    procs = {
        name: w.launch(
            [
                "restore",
                "--mesh",
                ",".join(map(str, shape)),
                "--workdir",
                str(workdir),
                "--save-every",
                "2",
                "--out",
                str(workdir / f"{name}.npz"),
            ],
            devices,
        )
        for name, (devices, shape) in TARGETS.items()
    }
    w.finish(list(procs.values()))
    outputs = {name: dict(np.load(workdir / f"{name}.npz")) for name in TARGETS}
    return saved_values, w.flatten(next_state), float(loss), outputs


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_restored_values_are_bit_identical(saved, name):
    saved_values, _, _, outputs = saved
    out = outputs[name]
    assert int(out["step"]) == 2
    restored = {k.removeprefix("restored/"): v for k, v in out.items() if k.startswith("restored/")}
    assert restored.keys() == saved_values.keys()
    for key, value in saved_values.items():
        assert restored[key].dtype == value.dtype, key
        assert restored[key].tobytes() == value.tobytes(), key
    assert json.loads(str(out["config"])) == {"model": {"d_hidden": 32}, "save_every": 2}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_restored_arrays_carry_the_new_mesh_shardings(saved, name):
    devices, shape = TARGETS[name]
    specs = json.loads(str(saved[3][name]["specs"]))
    mesh_shape = str(dict(zip(w.AXES, shape, strict=True)))
    kernel = ".params['up']['kernel'].value"
    assert specs[kernel] == f"{mesh_shape} P('fsdp', 'tensor')"
    assert specs[".opt_state[0].mu['down']['kernel'].value"] == f"{mesh_shape} P('tensor', 'fsdp')"
    assert specs[".rng"] == f"{mesh_shape} P()"
    assert json.loads(str(saved[3][name]["dtypes"]))[".rng"] == "key<fry>"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_next_step_on_the_new_mesh_matches(saved, name):
    # Another mesh splits the batch mean and the matmul contractions into different partial
    # sums, so float32 results differ by a few ulp (measured: loss 6e-8, params <= 3e-8):
    # rtol 1e-6 is ~8 ulp. Entries that are near-zero sums of opposite-sign terms (Adam's
    # first moments) keep an absolute error of a few ulp of those terms (~1e-8): atol 1e-7.
    _, next_values, loss, outputs = saved
    out = outputs[name]
    np.testing.assert_allclose(float(out["loss"]), loss, rtol=1e-6)
    for key, value in next_values.items():
        np.testing.assert_allclose(out[f"next/{key}"], value, rtol=1e-6, atol=1e-7, err_msg=key)
