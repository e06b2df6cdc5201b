"""The command line's errors: one line naming what was wrong, never a traceback unless --debug."""

import subprocess
import sys

import pytest
import torch

from controlnet.cli import main


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from controlnet.cli import build_parser

    def broken(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["inspect"]
    sub.set_defaults(handler=broken)
    monkeypatch.setattr("controlnet.cli.build_parser", lambda: parser)
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "controlnet inspect: error: internal error: RuntimeError: CUDA error: an illegal memory access was "
        "encountered (run again with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["inspect", "x", "--debug"])
    with pytest.raises(RuntimeError):
        main(["--debug", "inspect", "x"])


def test_a_torch_pickle_named_safetensors_is_read_by_its_content(tmp_path, capsys):
    path = tmp_path / "renamed.safetensors"
    torch.save({"weight": torch.zeros(2)}, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown checkpoint layout" in err and "first keys: weight" in err


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    shell = f"{sys.executable} -m controlnet.cli preprocess --list | head -1"
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, text=True)
    assert done.stdout.count("\n") == 1 and done.stderr == ""


def test_cpu_threads_follow_the_free_cores_unless_the_user_chose(monkeypatch):
    """On a busy machine torch's one thread per core slows CPU work several times over: the
    command takes the cores the load average leaves free; a thread count the user set is kept."""
    import os

    from controlnet.cli import common

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for variable in common.THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for load, threads in ((0.2, "8"), (5.4, "3"), (30.0, "1")):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        common.use_free_cores()
        assert os.environ["OMP_NUM_THREADS"] == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    common.use_free_cores()
    assert os.environ["OMP_NUM_THREADS"] == "2"
    # the command itself starts torch with that count
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = "import controlnet.cli.common as c, torch; c.use_free_cores(); print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
