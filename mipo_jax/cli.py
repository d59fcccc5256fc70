"""Command-line plumbing of `mipo_jax.main` and `mipo_jax.demo`: a user's mistake is one
short message and exit code 2, not a traceback (``--debug`` shows the traceback).

* `parse_flags` (absl's ``flags_parser``): a mistyped ``--config.KEY`` names the key and its
  nearest existing keys (`mipo_jax.config_docs.unknown_key`); a bad config file or argument
  says which.
* `user_errors`: around the run, errors about the config, the data or paths (``ValueError``,
  ``OSError``: missing files, permissions, a full disk) are printed as ``error: <message>``.
"""

import contextlib
import importlib.util
import os
import sys

from absl import flags

from mipo_jax.config_docs import unknown_key

USER_ERRORS = (ValueError, OSError)  # config, data, paths (missing files, a full disk)
EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print ``message`` as a user error and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    print("(add --debug to see the traceback)", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _flag_value(argv, name: str) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config(spec: str):
    """The config of ``--config=FILE[:ARG]`` (as ml_collections' config_flags loads it)."""
    path, _, arg = spec.partition(":")
    loader = importlib.util.spec_from_file_location("_mipo_config", path)
    if loader is None:
        raise ValueError(f"--config={spec}: {path} is not a Python config file")
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
    except FileNotFoundError:
        raise ValueError(f"--config={spec}: no such file {path}") from None
    return module.get_config(arg or None)


def explain_flag_error(err: Exception, argv) -> str:
    """A short message for a flag-parsing error."""
    spec = _flag_value(argv, "config")
    if spec is not None:
        try:
            config = load_config(spec)
        except Exception as e:  # the file itself or its argument is wrong
            return f"--config={spec}: {e}"
        for a in argv:
            if a.startswith("--config."):
                key = a[len("--config.") :].split("=", 1)[0]
                message = unknown_key(config, key)
                if message:
                    return message
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def resolve_config_names(argv: list[str]) -> list[str]:
    """``--config=dpo[:arg]`` (a name, no ``.py``) → the installed ``configs/dpo.py[:arg]``,
    so the command works from any folder once the package is installed."""
    out = []
    for a in argv:
        if a.startswith("--config=") and ".py" not in a and "/" not in a:
            name, colon, arg = a.removeprefix("--config=").partition(":")
            import configs

            path = os.path.join(os.path.dirname(configs.__file__), f"{name}.py")
            if not os.path.isfile(path):
                fail(
                    f"--config={name}: no such config; choose one of: {', '.join(configs.names())}"
                )
            a = f"--config={path}{colon}{arg}"
        out.append(a)
    return out


def parse_flags(argv):
    """absl ``flags_parser``: parse, or exit 2 with a short message."""
    argv = resolve_config_names(argv)
    spec = _flag_value(argv, "config")
    if spec is not None and not os.path.isfile(spec.partition(":")[0]):
        fail(f"--config={spec}: no such config file {spec.partition(':')[0]!r} (see configs/)")
    try:
        return flags.FLAGS(argv)
    except Exception as err:
        if "--debug" in argv:
            raise
        fail(explain_flag_error(err, argv))


@contextlib.contextmanager
def user_errors(debug: bool):
    """Errors about the config, data or paths: a short message and exit 2 (unless debug)."""
    try:
        yield
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except USER_ERRORS as err:
        if debug:
            raise
        fail(str(err) or type(err).__name__)
